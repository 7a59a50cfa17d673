"""The language-modelling loss at labelled positions only (method=pt, sft) and the choice of that path for every
Trainer that takes log-probs of labelled tokens (medgpt.stages.preference: DPO and its variants, KTO).

`method.fused_loss=true` (default) takes medgpt.modeling.token_logps' path: the LM head and the cross-entropy run
only where a label is, in chunks, never holding batch × length × vocab logits. It falls back to the model's own
full-logits loss, saying why once in the log, when that module refuses the model (full fine-tuning: the head
trains; a model type with soft-capped or scaled logits), under FSDP or ZeRO-3 (the head's weight is sharded outside
the forward), with a label smoother or a custom loss function, and when a caller needs the logits themselves
(`compute_metrics`). The loss is the one transformers computes — the sum over labelled tokens divided by the
Trainer's `num_items_in_batch` (or their mean when the model takes no loss kwargs), scaled the same way across
processes — so gradient accumulation and DDP see the same numbers (tests/test_token_logps.py).
"""

from __future__ import annotations

import logging

from transformers import Trainer

from medgpt.modeling.token_logps import fallback_reason, labelled_logps

log = logging.getLogger(__name__)


class LabelledLoss:
    """Trainer mixin: whether this trainer's model takes the labelled-positions path (decided once, logged once)."""

    fused_loss = True  # set from method.fused_loss by medgpt.stages.training.make_trainer
    _labelled_only: bool | None = None

    def labelled_only(self, model) -> bool:
        if self._labelled_only is None:
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

            reason = ("method.fused_loss=false" if not self.fused_loss else fallback_reason(model)
                      or ("FSDP shards the head's weight" if self.is_fsdp_enabled else None)
                      or ("ZeRO-3 shards the head's weight" if is_deepspeed_zero3_enabled() else None))
            self._labelled_only = reason is None
            if reason is None:
                log.info("loss: LM head and cross-entropy at labelled positions only, in chunks (method.fused_loss)")
            else:
                log.info("loss: the model's full logits (%s)", reason)
        return self._labelled_only


class LMTrainer(LabelledLoss, Trainer):
    """transformers.Trainer whose causal-LM loss is computed at labelled positions only (see the module docstring)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if ((return_outputs and self.compute_metrics is not None) or self.label_smoother is not None or self.compute_loss_func is not None
                or "labels" not in inputs or not self.labelled_only(model)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        logps, _ = labelled_logps(model, {k: v for k, v in inputs.items() if k != "labels"}, inputs["labels"])
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:  # transformers' ForCausalLMLoss with reduction=sum
            loss = -logps.sum() / (num_items_in_batch.to(logps.device) if hasattr(num_items_in_batch, "to") else num_items_in_batch)
            if self.args.average_tokens_across_devices:  # as Trainer.compute_loss scales it
                loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
        else:
            loss = -logps.mean()
        return (loss, {"loss": loss}) if return_outputs else loss
