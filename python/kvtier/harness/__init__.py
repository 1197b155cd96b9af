"""What measures kvtier, kept apart from what an engine embeds (the rest of the package).

- :mod:`kvtier.harness.workload`: agent-trace workloads (kvtier's JSONL format, Mooncake traces,
  the embedded default and coding-agent generators).
- :mod:`kvtier.harness.driver`: the virtual-time event loop and the per-policy runner shared by
  the replay and the simulator.
- :mod:`kvtier.harness.replay`: ``kvtier replay`` on a real decoder (transformers).
- :mod:`kvtier.harness.vllm_replay`: ``kvtier replay --engine vllm`` inside real vLLM engines.
- :mod:`kvtier.harness.sim`: ``kvtier simulate``, the same driver at fleet scale on modelled servers.
- :mod:`kvtier.harness.benchmarks`: ``kvtier bench copy|nvme|remote`` and the metadata store's
  costs, each against its anchor in the same run.

The library never imports from here; the CLI (:mod:`kvtier.cli`) loads these lazily.
"""
