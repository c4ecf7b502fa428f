"""Start-up probes of what the data pipeline will need later: the Hugging Face hub (network, a streamed data set)
and a model vocabulary that holds every token id. Each failure is one line (DataError) naming the cause and the fix,
said before the model is built instead of a traceback from the prefetch thread or an embedding lookup."""

from __future__ import annotations

from lotus_dist.errors import first_line
from .errors import DataError

PROBE_TIMEOUT_S = 5.0  # one request; huggingface_hub's own retries take ~25 s per file without a network


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE=1`` (read at call time: tests and callers may set huggingface_hub's constant)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def datasets_offline() -> bool:
    """``datasets``' own view: HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE."""
    try:
        from datasets import config

        return bool(config.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return hub_offline()


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S):
    """None when the hub endpoint (``HF_ENDPOINT``) answers one request, whatever its status; else the reason.
    Through huggingface_hub's own session, so its proxies and client settings apply."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(hub_endpoint(), timeout=timeout)
    except Exception as e:  # requests' or httpx's connection errors, DNS failures, timeouts
        return first_line(e)
    return None


def probe_hub_dataset(data_cfg, splits) -> None:
    """``data.source=c4`` without ``data.path`` streams ``data.hub_name``: refuse at start-up when the hub cannot
    be reached or the data set cannot be opened (a typo, offline without a cache)."""
    name = f"{data_cfg.hub_name}/{data_cfg.hub_config}"
    fix = "set data.path= to a local C4 mirror (README, Data)"
    if not datasets_offline():
        reason = hub_unreachable()
        if reason:
            raise DataError(f"data.source=c4 without data.path streams '{name}' from the hub, but there is no "
                            f"network ({hub_endpoint()}: {reason}); {fix}, or set HF_HUB_OFFLINE=1 with the data "
                            f"set in the Hugging Face cache (HF_HUB_CACHE)")
    from .text_sources import hub_factory

    for split in splits:
        try:
            hub_factory(data_cfg.hub_name, data_cfg.hub_config, split)()  # resolves the files; reads no data
        except Exception as e:
            where = "from the Hugging Face cache (HF_HUB_OFFLINE=1)" if datasets_offline() else "on the hub"
            raise DataError(f"data.source=c4: the data set '{name}' split '{split}' cannot be opened {where}: "
                            f"{first_line(e)}; check data.hub_name / data.hub_config, or {fix}") from None


def check_vocab(model_vocab_size: int, tokenizer) -> None:
    """The embedding must have a row for every id the tokenizer emits (else an IndexError on CPU, a device-side
    assert on CUDA, at the first batch)."""
    if model_vocab_size < tokenizer.vocab_size:
        raise DataError(f"config key 'model.vocab_size' ({model_vocab_size}) is smaller than the vocabulary of "
                        f"data.tokenizer '{tokenizer.path}' ({tokenizer.vocab_size} ids); set model.vocab_size "
                        f">= {tokenizer.vocab_size}, or leave it null to take the tokenizer's")
