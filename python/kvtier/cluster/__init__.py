"""kvtier across workers: UCX peers (the data plane), metadata on a store, migration."""
