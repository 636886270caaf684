"""The offline API: LLM(model=...).generate(prompts, sampling_params), as vLLM's."""
from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine, PromptType
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    def __init__(self, model: str | None = None, **engine_args) -> None:
        self.llm_engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))
        self._counter = 0

    def get_tokenizer(self):
        return self.llm_engine.get_tokenizer()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        priority: one integer per prompt for scheduling_policy="priority" (lower runs first)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts")

        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority has {len(priorities)} entries for {len(prompts)} prompts")

        # Only the finished outputs are read: the engine need not build one per request per step.
        params_list = [p.clone(output_kind=RequestOutputKind.FINAL_ONLY) if isinstance(p, SamplingParams) else p
                       for p in params_list]
        engine = self.llm_engine
        # A bad constraint is an error here, before anything runs (each distinct one compiled once).
        for params in params_list:
            if isinstance(params, SamplingParams) and params.structured_outputs is not None:
                engine.compile_structured_outputs(params.structured_outputs)
        ids = []
        try:
            for prompt, params, prio in zip(prompts, params_list, priorities):
                rid = str(self._counter)
                self._counter += 1
                engine.add_request(rid, prompt, params, priority=prio)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # all or nothing: no half-added batch keeps running
            raise

        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
            while len(finished) < len(ids):
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[rid] for rid in ids]
