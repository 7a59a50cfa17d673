"""RoPE scaling (`model.rope_scaling` + `model.rope_factor`): positions beyond the length a model was trained for.

Supports `linear` (position interpolation: every position divided by the factor), `dynamic` (NTK-aware: the
rotary base grows only once a sequence is longer than the trained length) and `yarn`; the factor is > 1
(limits in medgpt.config). transformers 5.x keeps this in the model config's `rope_parameters` (the older
name `rope_scaling` is a deprecated alias), so the scaling is applied to the config BEFORE the weights
load (the rotary embedding reads it when it is built), with the model's own `rope_theta` kept. linear
and yarn also raise `max_position_embeddings` to the trained length x factor (the context length serving
allows; yarn keeps the trained length as `original_max_position_embeddings`); dynamic keeps it, since
dynamic NTK measures its scaling from it.

Refuses (one sentence): a model whose config has no rotary embedding, and a model that already uses another
RoPE scaling (e.g. Llama 3.1's `llama3`), which this would silently replace. Loading a folder that already
carries the same scaling (a run's model/ or merged/) changes nothing, so applying it twice is harmless.

Written: with the weights. model/ and merged/ hold it in config.json; an adapter run records it in
adapter/medgpt_base.json (medgpt.modeling.vocab.BASE_CHANGES), which merge and serving apply to the base.
"""

from __future__ import annotations

import logging

from medgpt.errors import ModelError

log = logging.getLogger(__name__)

STRETCHES_CONTEXT = ("linear", "yarn")  # the types after which max_position_embeddings grows by the factor


def rope_settings(model_cfg) -> dict | None:
    """{"type", "factor"} from `model.rope_scaling` / `model.rope_factor`, or None when no scaling is asked for."""
    kind = model_cfg.get("rope_scaling")
    return {"type": str(kind), "factor": float(model_cfg.get("rope_factor", 2.0))} if kind else None


def apply_rope_scaling(config, scaling: dict | None, where: str = "the model"):
    """Write `scaling` ({"type", "factor"}) into a transformers config (in place; returned); None changes nothing."""
    if not scaling:
        return config
    kind, factor = scaling["type"], float(scaling["factor"])
    current = dict(getattr(config, "rope_parameters", None) or {})
    if not current and getattr(config, "rope_theta", None) is None:
        raise ModelError(f"model.rope_scaling={kind}: {where} ({type(config).__name__}) has no rotary position embedding to scale.")
    current_type = current.get("rope_type", current.get("type", "default"))
    if current_type == kind and float(current.get("factor", 0)) == factor:
        return config  # a folder saved with this scaling already
    if current_type != "default":
        raise ModelError(f"model.rope_scaling={kind}: {where} already uses RoPE scaling {current_type!r} "
                         f"(factor {current.get('factor')}), which this would replace; leave model.rope_scaling unset for it.")
    trained = int(config.max_position_embeddings)
    params = {"rope_type": kind, "factor": factor, "rope_theta": current.get("rope_theta", getattr(config, "rope_theta", None))}
    if "partial_rotary_factor" in current:
        params["partial_rotary_factor"] = current["partial_rotary_factor"]
    if kind == "yarn":
        params["original_max_position_embeddings"] = trained
    config.rope_parameters = params
    if kind in STRETCHES_CONTEXT:
        config.max_position_embeddings = int(trained * factor)
    log.info("RoPE scaling: %s x%g (trained length %d, max_position_embeddings now %d)", kind, factor, trained,
             config.max_position_embeddings)
    return config


def scaled_config(path: str, scaling: dict, trust_remote_code: bool = False, revision: str | None = None):
    """The config of the model folder `path` with `scaling` applied (pass it to from_pretrained as `config=`)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    return apply_rope_scaling(config, scaling, path)
