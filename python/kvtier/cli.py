"""The ``kvtier`` command: ``kvtier info``, ``kvtier replay``, ``kvtier simulate``, ``kvtier bench copy|nvme|remote``."""

from __future__ import annotations

import argparse
import json
import sys

from kvtier.errors import InvalidArgumentError, KvtierError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3}


def _size(text: str) -> int:
    """Bytes from '8MiB', '1.5GiB', '4096'."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 64MiB, 2GiB or 4096, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier", description="KV-cache tiering engine for LLM inference")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="version, compiled backends and what is usable on this machine")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")

    rp = sub.add_parser("replay", help="replay an agent-trace workload on a real decoder under each cache policy")
    rp.add_argument("--model", default=None, help="local transformers causal-LM folder (default: a built-in tiny model)")
    rp.add_argument("--workload", default=None, help="JSONL workload (default: a generated agent workload)")
    rp.add_argument("--policy", action="append", default=None,
                    help="none, device-lru, tiered, trace-aware, trace-aware-nohint (gap hints withheld), or all "
                         "(repeatable; default: trace-aware)")
    rp.add_argument("--json", metavar="PATH", help="write the report as JSON")
    rp.add_argument("--plot", metavar="PNG", help="write a plot of JCT, prefill and hits per policy")
    rp.add_argument("--device-budget", type=_size, default=None, help="device tier size (default: 1/16 of the workload's KV: too small for it)")
    rp.add_argument("--dram-budget", type=_size, default=None, help="DRAM tier size (default: 1/8 of the workload's KV)")
    rp.add_argument("--nvme-dir", default=None, help="NVMe tier directory (default: a temporary one here)")
    rp.add_argument("--nvme-budget", type=_size, default=None, help="NVMe tier size (default: 2x the workload's KV)")
    rp.add_argument("--traces", type=_positive_int, default=None,
                    help="root traces in the generated workload (default 8; with --workers N, 8 per worker: each "
                         "worker as loaded as the single replay's server; with --engine vllm 16, docs/vllm.md)")
    rp.add_argument("--seed", type=int, default=0, help="seed of the generated workload")
    rp.add_argument("--generator", choices=("agent", "coding-agent"), default="agent",
                    help="the generated workload (without --workload): agent (default) or coding-agent (contexts "
                         "to ~2k tokens, compactions, task subagents with their own prompt: issue 12 finding 6)")
    rp.add_argument("--write-workload", metavar="PATH", help="write the generated workload as JSONL (real gaps, before --gap-scale) and exit")
    rp.add_argument("--compute-time", choices=("measured", "calibrated"), default="calibrated",
                    help="a step's model compute: its tokens at the model's measured per-token speed "
                         "(default: less noise), or its wall time; cache work is wall time either way")
    rp.add_argument("--gap-scale", type=_positive_float, default=0.1,
                    help="multiply every tool-call gap (default 0.1: the load of a busy replica; 1 replays the "
                         "real gaps, which leave this small server idle)")
    rp.add_argument("--torch-threads", type=_positive_int, default=None,
                    help="compute threads for the model (default: half the cores)")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    rp.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                    help="vllm: drive a real vLLM engine in wall-clock time with the configurations engine, "
                         "example, kvtier-tiered, kvtier-trace-aware (docs/vllm.md)")
    rp.add_argument("--workers", type=_positive_int, default=1,
                    help="N >= 2: N worker processes, each with its own decoder and tiers, behind a router that "
                         "may migrate a trace's KV to another worker during its tool gap (real UCX and Redis; "
                         "kvtier.harness.clusterreplay); the cache policy is tiered")
    rp.add_argument("--migration", action="append", default=None, choices=("none", "full", "dedup", "all"),
                    help="--workers: none (a trace stays on its worker), full (a migration resends every block), "
                         "dedup (only the blocks the target lacks), or all (default; repeatable)")
    rp.add_argument("--store", default=None, metavar="URL",
                    help="--workers: the Redis store (default: start a throwaway redis-server)")
    rp.add_argument("--transport", choices=("shm", "tcp"), default="shm",
                    help="--workers: UCX between the workers: shm (shared memory, default) or tcp (loopback)")
    rp.add_argument("--threshold", type=float, default=None, metavar="S",
                    help="--workers: the router's queueing threshold in seconds (default: a 256-token prefill)")
    rp.add_argument("--repeats", type=_positive_int, default=1, help="--engine vllm: runs of each configuration")
    rp.add_argument("--vllm-blocks", type=_positive_int, default=None,
                    help="--engine vllm: vLLM's own KV cache in 128-token blocks (default: 1/8 of the workload's KV, "
                         "at least the longest context and one block more)")

    sm = sub.add_parser("simulate", help="SIMULATION: the cache policies at fleet scale on a modelled GPU server")
    sm.add_argument("--server", default="h100-llama3-8b", help="server model preset (see --list-servers)")
    sm.add_argument("--list-servers", action="store_true", help="print the server model presets and exit")
    sm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a server model field, e.g. --set hbm_kv_gib=20 (repeatable)")
    sm.add_argument("--servers", type=_positive_int, default=None,
                    help="servers in the fleet (default 2: sized so that the default workload keeps them busy); "
                         "each keeps its traces (no router)")
    sm.add_argument("--workers", type=int, default=1,
                    help="N >= 2: N workers behind a router that may migrate a trace's KV during its tool gap "
                         "(kvtier.harness.simcluster, Note [Router]); the cache policy is tiered. Default 1: the fleet of "
                         "--servers, unchanged")
    sm.add_argument("--migration", default=None,
                    help="with --workers N >= 2: none, full, dedup or all (default all): what a migration "
                         "decision does (none: the trace waits at home; full: resend all its blocks; dedup: only "
                         "the blocks the target lacks)")
    sm.add_argument("--network", default=None,
                    help="with --workers N >= 2: the network model for migrations, shm, tcp or rdma-400g "
                         "(default rdma-400g; sources in docs/cluster.md, \"Network model\")")
    sm.add_argument("--route-threshold", type=float, default=None, metavar="SECONDS",
                    help="with --workers N >= 2: queueing at home beyond which the router moves a trace, and "
                         "the margin by which the target must be less queued (default 1.0)")
    sm.add_argument("--traces", type=_positive_int, default=1000, help="root traces (subagents come on top)")
    sm.add_argument("--policy", action="append", default=None,
                    help="none, device-lru, tiered, trace-aware, trace-aware-nohint (gap hints withheld), or all "
                         "(repeatable; default: all)")
    sm.add_argument("--device-budget", type=_size, default=None,
                    help="HBM for cached KV per server (default: the server model's hbm_kv_gib)")
    sm.add_argument("--block-tokens", type=_positive_int, default=64, help="tokens per KV block (default 64)")
    sm.add_argument("--workload", default=None, help="JSONL workload (default: the fleet-scale agent workload)")
    sm.add_argument("--generator", choices=("agent", "coding-agent"), default="agent",
                    help="the generated fleet workload (without --workload): agent (default) or coding-agent")
    sm.add_argument("--seed", type=int, default=0, help="seed of the generated workload")
    sm.add_argument("--json", metavar="PATH", help="write the report as JSON")
    sm.add_argument("--plot", metavar="PNG", help="write a plot of JCT, prefill and hits per policy")
    sm.add_argument("--check-replay", metavar="REPLAY_JSON",
                    help="simulate a kvtier replay report's workload on a model of the machine it ran on, and "
                         "compare with its real figures")
    sm.add_argument("--no-progress", action="store_true", help="no progress bar")

    bench = sub.add_parser("bench", help="microbenchmarks (kvtier against an anchor, same run)")
    bsub = bench.add_subparsers(dest="suite", required=True)
    copy = bsub.add_parser("copy", help="block gather/scatter throughput vs plain memcpy")
    copy.add_argument("--json", metavar="PATH", help="write results as JSON to PATH")
    copy.add_argument("--size-mib", type=_positive_int, default=512, help="bytes per transfer (default 512 MiB)")
    copy.add_argument("--reps", type=_positive_int, default=7, help="repetitions per case (median reported)")
    copy.add_argument("--threads", type=_positive_int, default=None, help="copy threads (default: one per core)")
    copy.add_argument("--block-tokens", type=_positive_int, default=16, help="tokens per KV block (default 16)")
    copy.add_argument("--cases", default=None, help="only cases whose name contains this text")
    copy.add_argument("--seed", type=int, default=0, help="seed for block-id permutations")
    copy.add_argument("--quick", action="store_true", help="small and fast (64 MiB, 3 reps): a smoke run")
    copy.add_argument("--no-progress", action="store_true", help="no progress bar")
    nvme = bsub.add_parser("nvme", help="NVMe tier vs fio (io_uring, O_DIRECT) and NIXL's POSIX backend")
    nvme.add_argument("--json", metavar="PATH", help="write results as JSON to PATH")
    nvme.add_argument("--dir", default=None, help="directory on the file system to test (default: a new one here)")
    nvme.add_argument("--size-mib", type=_positive_int, default=512, help="bytes per case (default 512 MiB)")
    nvme.add_argument("--reps", type=_positive_int, default=3, help="repetitions per case (median reported)")
    nvme.add_argument("--queue-depth", type=_positive_int, default=256,
                      help="I/O queue depth for kvtier, fio and NIXL (default 256: see docs/benchmarks.md)")
    nvme.add_argument("--max-io-kib", type=_positive_int, default=4096, help="kvtier largest I/O request (KiB)")
    nvme.add_argument("--cases", default=None, help="only cases whose name contains this text")
    nvme.add_argument("--nixl-python", default=None,
                      help="python that has nixl-cu12 installed (default: $KVTIER_NIXL_PYTHON or this one)")
    nvme.add_argument("--seed", type=int, default=0)
    nvme.add_argument("--quick", action="store_true", help="small and fast (64 MiB, 1 rep): a smoke run")
    nvme.add_argument("--no-progress", action="store_true", help="no progress bar")
    remote = bsub.add_parser("remote", help="UCX put/get between two processes vs ucx_perftest and NIXL's UCX backend")
    remote.add_argument("--json", metavar="PATH", help="write results as JSON to PATH")
    remote.add_argument("--transport", choices=["shm", "tcp", "both"], default="both",
                        help="shm (UCX_TLS=posix,cma,tcp) or tcp (UCX_TLS=tcp), on loopback (default: both)")
    remote.add_argument("--size-mib", type=_positive_int, default=128, help="bytes per sample (default 128 MiB)")
    remote.add_argument("--reps", type=_positive_int, default=6, help="rounds per case (paired ratios need 6)")
    remote.add_argument("--cases", default=None, help="only cases whose name contains this text")
    remote.add_argument("--nixl-python", default=None,
                        help="python that has nixl-cu12 installed (default: $KVTIER_NIXL_PYTHON or this one)")
    remote.add_argument("--seed", type=int, default=0)
    remote.add_argument("--quick", action="store_true", help="small and fast (16 MiB, 2 rounds): a smoke run")
    remote.add_argument("--no-progress", action="store_true", help="no progress lines")
    return p


def _simulate(args: argparse.Namespace) -> int:
    import dataclasses

    from kvtier.harness import sim
    from kvtier.harness import workload as wl

    if args.list_servers:
        for name, m in sim.PRESETS.items():
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(m).items() if k != "name"))
        return 0
    if args.check_replay:
        sim.check_against_replay(args.check_replay, json_path=args.json, progress=not args.no_progress)
        return 0
    if args.server not in sim.PRESETS:
        raise InvalidArgumentError(f"unknown server model {args.server!r}; presets: {', '.join(sim.PRESETS)}")
    server = sim.PRESETS[args.server]
    fields = {f.name: f.type for f in dataclasses.fields(server)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "name":
            raise InvalidArgumentError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                                       f"{', '.join(k for k in fields if k != 'name')}")
        try:
            cast = str if key == "model" else (int if key == "kv_bytes_per_token" else float)
            server = dataclasses.replace(server, **{key: cast(value)})
        except ValueError:
            raise InvalidArgumentError(f"--set {item!r}: {value!r} is not a number") from None
    hbm = None if args.device_budget is None else args.device_budget / 2**30
    if isinstance(args.workers, int) and args.workers == 1:
        for flag, value in (("--migration", args.migration), ("--network", args.network),
                            ("--route-threshold", args.route_threshold)):
            if value is not None:
                raise InvalidArgumentError(f"{flag} {value!r} needs --workers N with N >= 2 (got --workers 1)")
    else:
        from kvtier.harness import simcluster

        if args.workers < 1:
            raise InvalidArgumentError(f"--workers must be >= 1, got {args.workers}")
        if args.servers is not None:
            raise InvalidArgumentError(f"--servers {args.servers} and --workers {args.workers}: give one (with "
                                       "--workers the workers are the servers)")
        policies = args.policy or ["tiered"]
        if len(policies) != 1:
            raise InvalidArgumentError(f"--workers {args.workers}: one cache policy, got {', '.join(policies)}")
        workload = wl.load(args.workload) if args.workload else (
            sim.fleet_coding_workload(args.traces, args.seed) if args.generator == "coding-agent" else None)
        simcluster.simulate_cluster(
            server=server, workers=args.workers, migration=args.migration or "all",
            network=args.network or "rdma-400g", cache_policy=policies[0], traces=args.traces, seed=args.seed,
            workload=workload, block_tokens=args.block_tokens, hbm_kv_gib=hbm,
            threshold_s=1.0 if args.route_threshold is None else args.route_threshold, json_path=args.json,
            plot_path=args.plot, progress=not args.no_progress)
        return 0
    workload = wl.load(args.workload) if args.workload else (
        sim.fleet_coding_workload(args.traces, args.seed) if args.generator == "coding-agent" else None)
    sim.simulate(server=server, servers=2 if args.servers is None else args.servers, traces=args.traces,
                 policies=args.policy, seed=args.seed,
                 workload=workload, block_tokens=args.block_tokens, hbm_kv_gib=hbm, json_path=args.json,
                 plot_path=args.plot, progress=not args.no_progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            from kvtier.info import info, render

            data = info()
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                render(data)
            return 0
        if args.command == "replay":
            from kvtier.harness import replay

            if args.write_workload:
                from kvtier.harness import workload as wl

                vocab = 2048  # the built-in model's
                if args.model:
                    from transformers import AutoConfig

                    vocab = int(AutoConfig.from_pretrained(args.model, local_files_only=True).vocab_size)
                # The file holds the real (unscaled) gaps: a replay of it applies --gap-scale once.
                wl.dump(replay.load_workload(None, vocab, args.seed, args.traces or 8, 1.0, args.generator),
                        args.write_workload)
                print(f"wrote {args.write_workload} (real gaps; a replay scales them by --gap-scale)")
                return 0
            if args.workers > 1:
                if args.engine != "transformers" or args.policy:
                    raise InvalidArgumentError("--workers runs the transformers engine with the tiered policy; "
                                               "drop --engine vllm and --policy")
                from kvtier.harness import clusterreplay

                clusterreplay.run(model_dir=args.model, workload=args.workload, workers=args.workers,
                                  migration=args.migration, json_path=args.json, plot_path=args.plot,
                                  device_budget=args.device_budget, dram_budget=args.dram_budget,
                                  nvme_dir=args.nvme_dir, nvme_budget=args.nvme_budget, seed=args.seed,
                                  traces=args.traces, progress=not args.no_progress, compute_time=args.compute_time,
                                  gap_scale=args.gap_scale, generator=args.generator, store_url=args.store,
                                  transport=args.transport, threshold_s=args.threshold)
                return 0
            if args.migration or args.store:
                raise InvalidArgumentError("--migration and --store need --workers N (N >= 2)")
            if args.engine == "vllm":
                from kvtier.harness import vllm_replay

                vllm_replay.run(model_dir=args.model, workload=args.workload, json_path=args.json, plot_path=args.plot,
                                seed=args.seed, traces=args.traces, gap_scale=args.gap_scale, repeats=args.repeats,
                                vllm_blocks=args.vllm_blocks, dram_bytes=args.dram_budget, nvme_bytes=args.nvme_budget,
                                progress=not args.no_progress)
                return 0
            replay.run(model_dir=args.model, workload=args.workload, policies=args.policy, json_path=args.json,
                       plot_path=args.plot, device_budget=args.device_budget, dram_budget=args.dram_budget,
                       nvme_dir=args.nvme_dir, nvme_budget=args.nvme_budget, seed=args.seed, traces=args.traces or 8,
                       progress=not args.no_progress, torch_threads=args.torch_threads,
                       compute_time=args.compute_time, gap_scale=args.gap_scale, generator=args.generator)
            return 0
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "bench" and args.suite == "copy":
            from kvtier.harness.benchmarks import copy

            size, reps = (64, 3) if args.quick else (args.size_mib, args.reps)
            copy.run(size_mib=size, reps=reps, threads=args.threads, block_tokens=args.block_tokens,
                     cases=args.cases, seed=args.seed, json_path=args.json, progress=not args.no_progress)
            return 0
        if args.command == "bench" and args.suite == "nvme":
            from kvtier.harness.benchmarks import nvme

            size, reps = (64, 1) if args.quick else (args.size_mib, args.reps)
            nvme.run(directory=args.dir, size_mib=size, reps=reps, queue_depth=args.queue_depth,
                     max_io_bytes=args.max_io_kib << 10, cases=args.cases, nixl_python=args.nixl_python,
                     seed=args.seed, json_path=args.json, progress=not args.no_progress)
            return 0
        if args.command == "bench" and args.suite == "remote":
            from kvtier.harness.benchmarks import remote as remote_bench

            size, reps = (16, 2) if args.quick else (args.size_mib, args.reps)
            transports = ("shm", "tcp") if args.transport == "both" else (args.transport,)
            remote_bench.run(transports=transports, size_mib=size, reps=reps, cases=args.cases,
                             nixl_python=args.nixl_python, seed=args.seed, json_path=args.json,
                             progress=not args.no_progress)
            return 0
    except KvtierError as e:
        print(f"kvtier: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
