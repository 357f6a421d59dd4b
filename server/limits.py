"""ServerLimits: the bounds a server operator sets on the work one client can cause (flags in server/cli.py).

  max_queued_requests    engine requests waiting for a batch slot (the scheduler's waiting queue, one
                         per prompt); a request beyond it is answered 429 with Retry-After (SGLang's
                         --max-queued-requests). 0: no bound.
  max_client_batch_size  prompts in one /v1/completions request (TGI's --max-client-batch-size); more: 400.
  payload_limit          bytes of a request body (TGI's --payload-limit); more: 413. 0: no limit.
  default_max_tokens     max_tokens of a request that leaves it unset (chat, or completions with
                         "max_tokens": null), capped further by what is left of max_model_len; vLLM's
                         --override-generation-config '{"max_new_tokens": N}' sets the same. 0: no cap
                         (all of the context that is left).
"""
from __future__ import annotations

from dataclasses import dataclass

RETRY_AFTER_S = 1   # the Retry-After of a 429: one second, about a few decode steps' worth of finished requests


@dataclass(frozen=True)
class ServerLimits:
    max_queued_requests: int = 1024
    max_client_batch_size: int = 256
    default_max_tokens: int = 1024
    payload_limit: int = 32 * 2 ** 20      # 32 MiB: 256 prompts of ~30k token ids each

    def __post_init__(self):
        for name in ("max_queued_requests", "default_max_tokens", "payload_limit"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: no limit), got {getattr(self, name)!r}")
        if not isinstance(self.max_client_batch_size, int) or self.max_client_batch_size < 1:
            raise ValueError(f"max_client_batch_size must be an integer >= 1, got {self.max_client_batch_size!r}")
