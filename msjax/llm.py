"""`msjax.LLM`: offline batch generation with vLLM's names and meanings."""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

from msjax.config import DeploymentPlan
from msjax.engine.engine import Engine
from msjax.engine.sampling_params import InvalidRequestError, SamplingParams


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None  # None without a tokenizer
    logprobs: list[dict[int, float]] | None  # per token, when SamplingParams.logprobs was set
    finish_reason: str | None  # "stop", "length" or "abort"


class LLM:
    """`LLM(model, plan=None, **engine_options)`: `model` is an HF checkpoint directory or a preset name;
    `plan` a `DeploymentPlan` or the path of its TOML file (None: one device, one program);
    `engine_options` are `msjax.EngineConfig` fields (page_size, num_pages, max_num_seqs, ...)."""

    def __init__(self, model: str, plan: DeploymentPlan | str | os.PathLike | None = None, **engine_options):
        if plan is not None and not isinstance(plan, DeploymentPlan):
            if not Path(plan).is_file():
                raise InvalidRequestError("plan", f"{plan} is neither a DeploymentPlan nor a plan file")
            plan = DeploymentPlan.load(plan)
        self.engine = Engine.from_pretrained(model, plan=plan, **engine_options)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings or lists of token ids), with one SamplingParams for all
        or one per prompt. Results come back in the order of the prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise InvalidRequestError("prompts", "is empty")
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        if len(sampling) != len(prompts):
            raise InvalidRequestError("sampling", f"{len(sampling)} SamplingParams for {len(prompts)} prompts")
        encoded = [self.engine.encode(p) for p in prompts]  # validate every prompt before queueing any
        outputs: dict[str, RequestOutput] = {}
        for prompt, ids, sp in zip(prompts, encoded, sampling):
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, ids, sp)
            outputs[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids, [],
                                         "" if self.engine.tokenizer else None,
                                         [] if sp.logprobs is not None else None, None)
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                out = outputs.get(delta.request_id)
                if out is None:
                    continue
                out.token_ids += delta.token_ids
                if delta.text is not None:
                    out.text += delta.text
                if delta.logprobs is not None:
                    out.logprobs += delta.logprobs
                if delta.finished:
                    out.finish_reason = delta.finish_reason
        return list(outputs.values())
