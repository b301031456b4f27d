"""lm-evaluation-harness adapter: an `lmforge` model type for `lm_eval` (optional extra `lmeval`).

Python:
    import lmforge.eval.lm_eval_adapter  # registers "lmforge"
    lm_eval.simple_evaluate(model="lmforge", model_args="pretrained=runs/x/ckpt", tasks=[...])
Command line (lm_eval's own CLI, with the model type registered first):
    python -m lmforge.eval.lm_eval_adapter --model lmforge --model_args pretrained=PATH --tasks arc_easy

Any model lmforge can load (checkpoint, HF directory, .gguf) then runs through lm_eval's task
library, with lmforge's batched, prefix-sharing log-likelihood and batched generation.
"""
from __future__ import annotations

try:
    import lm_eval.models  # noqa: F401  (load the built-in model types before adding ours)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from lmforge.errors import LmforgeError
    raise LmforgeError("the lm-evaluation-harness adapter needs `pip install 'lmforge[lmeval]'`") from e

from lmforge.eval.backend import GenerationRequest
from lmforge.eval.local_backend import LocalBackend


@register_model("lmforge")
class LmforgeLM(LM):
    def __init__(self, pretrained: str, tokenizer: str | None = None, dtype: str | None = None,
                 device: str | None = None, batch_tokens: int | None = None, **_lm_eval_options):
        super().__init__()
        # lm_eval passes batch_size/max_batch_size/device; batching here is by token budget instead
        self.backend = LocalBackend.from_ref(pretrained, tokenizer=tokenizer, dtype=dtype,
                                             device=None if device in (None, "") else device,
                                             batch_tokens=int(batch_tokens) if batch_tokens else None)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.backend.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [nats for nats, _ in self.backend.loglikelihood_rolling([r.args[0] for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        converted = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = kwargs.get("do_sample", False)
            temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0)) if sample or "temperature" in kwargs else 0.0
            converted.append(GenerationRequest(context, int(kwargs.get("max_gen_toks", 256)), temperature,
                                               float(kwargs.get("top_p", 1.0)), int(kwargs.get("top_k", 0) or 0),
                                               stop=tuple(until)))
        return self.backend.generate(converted)

    @property
    def tokenizer_name(self) -> str:
        return self.backend.info.model

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.backend.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
