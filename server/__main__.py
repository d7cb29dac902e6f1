"""``python -m server`` (``./launch.sh serve``): the OpenAI-compatible server.

    ./launch.sh serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                      [--tp T] [--pp P] [--kv-cache-mib 512] [--block-size 16]
                      [--max-running 64] [--max-batched-tokens 512] [--max-wait-ms 0]
                      [--no-prefix-caching]
                      [--max-queue 256] [--request-timeout S] [--batching continuous|static]
                      [--response-cache memory|redis://HOST:PORT/DB] [--response-cache-size 1024]
                      [--response-cache-ttl 3600]

Without ``--model`` it serves the demo checkpoint. The API key may also come from
RINGLEADER_API_KEY, the host and port from RINGLEADER_HOST and RINGLEADER_PORT. With tp x pp > 1
the command starts itself again under torchrun, one process per rank: the replica's head (rank 0)
runs the HTTP front end and the scheduler, and every other rank runs the plans the head sends it.
SIGTERM (or SIGINT) drains: the server stops taking requests (503), gives the running ones
``--drain-timeout`` seconds, fails what is left with a clear error, tells the other ranks to exit,
and exits. Bad flags or checkpoints end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from comm.layout import LayoutError
from engine.cli import add_dtype_flag, add_parallel_flags, exec_torchrun, launched_as_rank
from engine.errors import RingleaderError
from server.cluster import add_cluster_flags
from server.routing import add_routing_flags, policy_from_flags
from server.tools import PARSERS as TOOL_PARSERS

DEFAULT_PORT = 8000
GENERATION_CONFIG = ("auto", "none")  # --generation-config


def _port(value) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [1, 65535], got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    from engine.compiled import MODES as DECODE_MODES
    from engine.quant import MODES as QUANT_MODES
    from engine.scheduler import BATCHING
    from server.response_cache import add_response_cache_flags

    parser = argparse.ArgumentParser(prog="ringleader serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the demo checkpoint)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients use")
    parser.add_argument("--host", default=os.environ.get("RINGLEADER_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=_port, default=os.environ.get("RINGLEADER_PORT", DEFAULT_PORT))
    parser.add_argument("--api-key", default=os.environ.get("RINGLEADER_API_KEY"))
    parser.add_argument(
        "--grpc-port",
        type=_port,
        default=os.environ.get("RINGLEADER_GRPC_PORT"),
        help="also serve the gateway's gRPC worker service (vllm.grpc.engine.VllmEngine) on this port "
        "(default: off)",
    )
    parser.add_argument(
        "--no-replica",
        action="store_true",
        help="a cluster member that is a front end only: it serves the API and routes every request "
        "to the other members' replicas; it reads the checkpoint's config and tokenizer, not its weights",
    )
    parser.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache memory per rank")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="compute every prompt in full instead of reusing the cached blocks of a prefix computed before",
    )
    parser.add_argument("--max-running", type=int, default=64, help="sequences in the running batch")
    parser.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per engine step")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long new requests may wait for others to start with them (dynamic batching)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting or running; more get 429"
    )
    parser.add_argument("--request-timeout", type=float, default=None, help="seconds before a request fails")
    parser.add_argument(
        "--drain-timeout", type=float, default=20.0, help="seconds to finish requests on SIGTERM"
    )
    parser.add_argument(
        "--step-deadline",
        type=float,
        default=10.0,
        help="a step running longer means a rank hangs: a cluster's leader moves the replica's requests",
    )
    parser.add_argument(
        "--batching",
        choices=BATCHING,
        default="continuous",
        help="continuous (requests join every step) or static (a batch runs until all finish)",
    )
    parser.add_argument("--max-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument(
        "--generation-config",
        choices=GENERATION_CONFIG,
        default="auto",
        help="auto: generation_config.json's temperature, top_p, top_k and repetition_penalty are the "
        "defaults of requests that leave them out; none: the API's own defaults (its stop ids count "
        "either way)",
    )
    parser.add_argument("--device", default=None)
    add_dtype_flag(parser)
    parser.add_argument(
        "--quantize", choices=QUANT_MODES, default=None, help="weight-only quantization at load"
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op CPU threads per rank")
    parser.add_argument(
        "--decode-mode",
        choices=DECODE_MODES,
        default="auto",
        help="compiled: decode steps through torch.compile, CUDA graphs on a GPU, batch sizes "
        "compiled at start; eager: no compilation (debugging); auto: compiled on a GPU with "
        "tp = pp = 1, eager otherwise",
    )
    parser.add_argument(
        "--tool-call-parser",
        choices=TOOL_PARSERS,
        default=None,
        help="the models' tool-call syntax read into tool_calls (default: the one the chat template writes)",
    )
    add_parallel_flags(parser)
    add_cluster_flags(parser)
    add_routing_flags(parser)
    add_response_cache_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        return _serve(args, argv)
    except (RingleaderError, LayoutError) as e:
        print(f"ringleader: error: {e}", file=sys.stderr)
        return 2


def _routing_policy(args):
    try:
        return policy_from_flags(args)
    except ValueError as e:
        raise RingleaderError(str(e)) from None


def _check_flags(args) -> None:
    for flag in ("kv_cache_mib", "block_size", "max_running", "max_batched_tokens", "max_queue"):
        if getattr(args, flag) < 1:
            raise RingleaderError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("request_timeout", "drain_timeout", "max_wait_ms", "timeout", "step_deadline"):
        value = getattr(args, flag)
        if value is not None and not value >= 0:
            raise RingleaderError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
    if args.threads is not None and args.threads < 1:
        raise RingleaderError(f"--threads must be >= 1, got {args.threads}")


def _serve(args, argv: list[str]) -> int:
    import torch

    from comm.layout import ParallelLayout
    from engine.config import ModelConfig
    from engine.demo import ensure_demo
    from engine.replica import check_layout
    from engine.tokenizer import load_tokenizer
    from server.response_cache import check_response_cache_flags

    _check_flags(args)
    if make_cluster(args)[0] is None and args.no_replica:  # its flags are checked before anything is loaded
        raise RingleaderError("--no-replica makes a front end for a cluster: it needs --cluster or --join")
    _routing_policy(args)
    check_response_cache_flags(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RingleaderError(f"--device {args.device}: CUDA is not available on this machine")
    model_dir = args.model or str(ensure_demo())
    config = ModelConfig.from_hf(model_dir)
    load_tokenizer(
        model_dir, config.vocab_size
    )  # a missing or bad tokenizer fails here, before any rank starts
    if args.no_replica:
        if args.tp * args.pp * args.nnodes > 1:
            raise RingleaderError("--no-replica runs no model: it takes no --tp, --pp or --nnodes")
        _check_port(args.host, args.port)
        return _serve_front_end(args, model_dir, config)
    layout = ParallelLayout(tp=args.tp, pp=args.pp, stage_layers=tuple(args.stage_layers or ()))
    check_layout(layout, config)
    if args.decode_mode == "compiled" and layout.world_size > 1:
        raise RingleaderError(
            f"--decode-mode compiled runs a whole model in one process; tp={layout.tp} x pp={layout.pp} "
            "replicas decode eagerly (--decode-mode auto or eager)"
        )
    as_rank = launched_as_rank(layout, args.nnodes)
    if not as_rank or int(os.environ.get("RANK", "0")) == 0:
        _check_port(args.host, args.port)  # before minutes of loading, not after
        if args.grpc_port is not None:
            _check_port(args.host, args.grpc_port)
    if (layout.world_size > 1 or args.nnodes > 1) and not as_rank:
        return exec_torchrun(args, layout, "server", argv)
    if as_rank:
        return _serve_rank(args, layout, model_dir)
    return _serve_local(args, model_dir, config)


def _check_port(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RingleaderError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise RingleaderError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


def _serve_local(args, model_dir: str, config) -> int:
    import torch

    from engine.config import default_device, resolve_dtype
    from engine.scheduler import Engine

    device = torch.device(args.device) if args.device else default_device()
    engine = Engine.from_pretrained(
        model_dir,
        device=device,
        dtype=resolve_dtype(args.dtype, config, device),
        max_len=args.max_len,
        kv_cache_mib=args.kv_cache_mib,
        block_size=args.block_size,
        progress=True,
        quantize=args.quantize,
        decode_mode=args.decode_mode,
        **_engine_knobs(args),
    )
    compiled = engine.warm_up()
    if compiled:
        print(f"ringleader: compiled decode steps for batch sizes {compiled}", file=sys.stderr, flush=True)
    _run_server(args, engine, model_dir, engine.executor.model)
    return 0


def _serve_front_end(args, model_dir: str, config) -> int:
    """A member with no replica: the engine it has is for its tokenizer and request checks; its
    model is shapes only (the meta device: no memory, no weights read) and never runs."""
    import torch

    from engine.model import CausalLM
    from engine.scheduler import Engine
    from engine.tokenizer import load_tokenizer

    max_len = min(args.max_len or config.max_position_embeddings, config.max_position_embeddings)
    with torch.device("meta"):
        model = CausalLM(config, max_len=max_len)
    model.rotary.build(torch.device("meta"), torch.float32)
    engine = Engine.for_model(model.eval(), 2, args.block_size, load_tokenizer(model_dir, config.vocab_size))
    _run_server(args, engine, model_dir, model)
    return 0


def _engine_knobs(args) -> dict:
    return {
        "max_running": args.max_running,
        "max_batched_tokens": args.max_batched_tokens,
        "batching": args.batching,
        "max_wait_s": args.max_wait_ms / 1000,
        "prefix_caching": args.prefix_caching,
    }


def _serve_rank(args, layout, model_dir: str) -> int:
    """One rank of a tp x pp replica: the head serves, the others follow its plans."""
    import torch
    import torch.distributed as dist

    from comm.dist import env_from, exit_lost_replica, exit_with_launcher, init
    from engine.config import ModelConfig, resolve_dtype
    from engine.executor import DistributedExecutor
    from engine.replica import load_stage, make_groups
    from engine.scheduler import Engine, cache_blocks

    env = env_from()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_with_launcher(env.rank)
    if env.rank != 0:
        # torchrun hands SIGTERM to every rank at once; the head drains first, then tells the others
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        env, device = init(
            env, timeout_s=args.timeout, device=torch.device(args.device) if args.device else None
        )
        per_node = min(layout.tp, env.local_world_size)
        tp = make_groups(layout, env.rank, args.timeout, args.allreduce, per_node)
        dtype = resolve_dtype(args.dtype, ModelConfig.from_hf(model_dir), device)
        replica = load_stage(
            model_dir, layout, env, tp, device, dtype, args.max_len, progress=True, quantize=args.quantize
        )
        if not replica.is_head:
            replica.follow()
        else:
            model, config = replica.model, replica.model.config
            # every stage gets the same number of blocks: as many as the largest stage's budget holds
            layers = max(len(layout.layers_of_stage(s, config.num_layers)) for s in range(layout.pp))
            blocks = cache_blocks(
                args.kv_cache_mib,
                layers,
                args.block_size,
                model.kv_heads,
                config,
                next(model.parameters()).dtype,
            )
            executor = DistributedExecutor(model, replica.ranks, device, timeout_s=args.timeout)
            engine = Engine(
                executor,
                config,
                blocks,
                args.block_size,
                replica.tokenizer,
                model.rotary.max_len,
                micro_batches=layout.pp,
                **_engine_knobs(args),
            )
            _run_server(args, engine, model_dir, model, layout)
        dist.destroy_process_group()
    except RuntimeError as e:  # torch.distributed's errors: a peer died, hung past the timeout, ...
        exit_lost_replica(env.rank, e)
    return 0


def make_cluster(args):
    """(Cluster, Signer) from the --cluster (or --join) flags, or (None, None) without them."""
    from server.cluster import ConfigError, cluster_from_flags

    if not args.cluster and not args.join:
        return None, None
    try:
        return cluster_from_flags(args)
    except ConfigError as e:
        raise RingleaderError(str(e)) from None


def _run_server(args, engine, model_dir: str, model, layout=None) -> None:
    from engine.config import GenerationConfig
    from server.app import create_app
    from server.state import ENGINE_LOOP, ServerConfig

    name = args.served_model_name or Path(model_dir).name
    defaults = GenerationConfig.from_hf(model_dir).defaults if args.generation_config == "auto" else {}
    cfg = engine.config
    per_block = 2 * len(model.layer_ids) * args.block_size * model.kv_heads * cfg.head_dim
    mib = engine.num_blocks * per_block * next(model.parameters()).element_size() / 2**20
    placement = f" on tp={layout.tp} x pp={layout.pp} ranks" if layout else ""
    if args.no_replica:
        print(f"ringleader: serving {name!r} at http://{args.host}:{args.port} as a front end with no "
              "replica: every request runs on another member's", file=sys.stderr, flush=True)  # fmt: skip
    else:
        print(
            f"ringleader: serving {name!r}{placement} at http://{args.host}:{args.port}; KV cache "
            f"{engine.num_blocks - 1} blocks of {args.block_size} tokens "
            f"({(engine.num_blocks - 1) * args.block_size} tokens, {mib:.0f} MiB"
            f"{' on the head rank' if layout else ''}); {args.batching} batching",
            file=sys.stderr,
            flush=True,
        )
    tok = engine.tokenizer
    stops = ", ".join(f"{i} ({tok.id_to_token(i)!r})" for i in sorted(engine.eos_ids)) or "none"
    taken = ", ".join(f"{k}={v}" for k, v in defaults.items()) or "none"
    print(
        f"ringleader: tokenizer {tok.path} ({tok.backend}, {tok.vocab_size} tokens); stop ids: {stops}; "
        f"chat template: {tok.settings.template_source or 'the default'}; sampling defaults from "
        f"generation_config.json: {taken}",
        file=sys.stderr,
        flush=True,
    )
    config = ServerConfig(
        model_name=name,
        sampling_defaults=defaults,
        api_key=args.api_key,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        routing=_routing_policy(args),
        tool_call_parser=args.tool_call_parser,
    )
    cluster, signer = make_cluster(args)
    app = create_app(engine, config, cluster, signer)
    if args.no_replica:
        from server.cluster_face import front_end_only

        front_end_only(app)
    if args.response_cache is not None:
        from server.response_cache import add_response_cache, model_identity, store_from_flags

        dtype = str(next(model.parameters()).dtype)
        add_response_cache(app, store_from_flags(args), model_identity(model_dir, dtype, args.quantize))
    app[ENGINE_LOOP].step_deadline_s = args.step_deadline
    if args.grpc_port is not None:
        from server.grpc_service import add_grpc

        add_grpc(app, args.host, args.grpc_port, model_dir)
    asyncio.run(_serve_until_signalled(app, args.host, args.port, config.drain_timeout_s))
    fatal = app[ENGINE_LOOP].fatal
    if fatal is not None:
        raise RuntimeError(str(fatal))  # the replica is lost: exit without waiting on its ranks
    engine.executor.shutdown()  # on a multi-rank replica: every other rank exits its loop


async def _serve_until_signalled(app, host: str, port: int, drain_timeout_s: float) -> None:
    from aiohttp import web

    from server.state import ENGINE_LOOP, FRONT

    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:
            raise RingleaderError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        app[ENGINE_LOOP].on_fatal = lambda error: stop.set()
        await stop.wait()
        t0 = time.monotonic()
        print("ringleader: shutting down: draining in-flight requests", file=sys.stderr, flush=True)
        # the request front: a cluster member's router waits for its clients' requests on every
        # replica, and for its own replica's, whoever sent them
        failed = await app[FRONT].drain(drain_timeout_s)
        print(
            f"ringleader: drained in {time.monotonic() - t0:.1f} s; {failed} unfinished requests failed",
            file=sys.stderr,
            flush=True,
        )
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
