"""GRPOModule: GRPO with a phased token-entropy term for (noisy-label) RLVR (spec ``specs/grpo_phased_entropy.md``).

One training step (spec §2.4): sample G completions per prompt → rewards → group advantages → log-probs and entropy
of the completion tokens with grad → ``Agg_pg(p + β·k3) − λ(s)·Agg_H(H)`` → optimizer step(s). The maths lives in
``loss.py`` / ``entropy.py`` / ``rewards.py``; the rollout plumbing in ``rollout.py``; this file only orchestrates.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from callbacks.calibration.distributed import is_fsdp
from datamodules.assets import check_model_source, resolve_model
from lit_modules.causal_lm import DTYPES
from lit_modules.grpo.entropy import EntropySchedule, MaxToMin, schedule_from_config, stage_label
from lit_modules.grpo.loss import (
    AdvantageScale,
    GRPOLossConfig,
    GRPOLossOutput,
    check_choice,
    group_advantages,
    grpo_loss,
    token_stats,
)
from lit_modules.grpo.multimodal import image_prompts
from lit_modules.grpo.policy import (
    freeze_vision_tower,
    is_image_text_model,
    load_policy,
    placeholder_token_ids,
    refuse_unsupported_strategy,
)
from lit_modules.grpo.phase_schedule import PhaseSchedule
from lit_modules.grpo.sharding import gathered, is_sharded, shard
from lit_modules.grpo.rewards import RewardSet, reward_name, weighted_sum
from lit_modules.grpo.step_metrics import ZeroRewardWatch, step_metrics
from lit_modules.grpo.rollout import (
    Rollout,
    completion_logits,
    decode,
    eos_token_ids,
    first_eos_mask,
    generate,
    label_scores,
    repeat_column,
    reward_columns,
    tokenize_prompts,
)

log = logging.getLogger(__name__)

RewardSpec = str | dict[str, Any] | Callable[..., list]


def _require(ok: bool, option: str, value: Any, allowed: str) -> None:
    """Eager validation: a ``ValueError`` naming the option, the bad value and what is allowed."""
    if not ok:
        raise ValueError(f"{option}={value!r} is not allowed; allowed: {allowed}.")


class GRPOModule(PhaseSchedule, LightningModule):
    """GRPO policy optimisation of a Hugging Face causal LM with a scheduled token-entropy coefficient λ(s).

    Batches are dicts of per-prompt lists: ``prompt`` (chat-templated text), ``label`` (possibly noisy), optionally
    ``clean_label`` / ``is_corrupted`` (evaluation only: never passed to rewards) and any other columns, which reward
    callables receive repeated per completion. ``validation_step`` decodes greedily and logs ``val/clean_acc``.

    Args:
        model_name_or_path: ``"smollm2-135m-instruct"`` (embedded) or a local HF folder.
        dtype: weight dtype after loading (the loss maths is fp32 regardless).
        num_generations: completions per prompt, G >= 2 (a group).
        temperature, top_p: sampling; log-probs and entropy use the same ``softmax(z/T)`` (spec §2.1).
        max_new_tokens: completion length limit L_max.
        loss_type: policy-loss aggregation (spec §1.4).
        scale_rewards: advantage normalisation by the group std, the batch std, or none (Dr. GRPO).
        epsilon_low, epsilon_high: clip range ``[1 − ε_low, 1 + ε_high]`` of the importance ratio.
        beta: k3-KL weight; a frozen reference copy of the policy is created only when ``beta > 0``.
        num_iterations: optimizer steps (μ) per generated batch; old log-probs are stored only when μ > 1.
        entropy_schedule: λ(s, S) (``entropy.py``); λ > 0 raises entropy, λ < 0 lowers it. A name or
            ``{"name": ..., **args}`` also works; ``None`` means λ ≡ 0 (vanilla GRPO).
        rewards, reward_weights: reward callables (registry names, import paths, dicts or callables) and weights;
            their weighted sum (None terms skipped) is the reward (spec §3.3, ``sum_then_normalize``).
        learning_rate, weight_decay: AdamW over the trainable parameters.
        optimizer: instead of that AdamW, a callable building the optimizer from the trainable parameters (from
            YAML: ``class_path: torch.optim.SGD`` + ``init_args``); called once the policy is loaded (and sharded).
        total_steps: S for the schedule; default ``trainer.max_steps`` if set, else
            ``trainer.estimated_stepping_batches × num_iterations``. Stored in checkpoints (resume keeps it).
        entropy_chunk_size: positions per fp32 chunk of the log-prob/entropy maths (memory bound).
        max_grad_norm: gradient-norm clipping before each optimizer step (None: off).
        freeze_vision: for image-text models, keep the vision tower frozen (only the language model trains).
        zero_reward_patience: warn once when no completion is rewarded for this many steps in a row (None: never).
        gather_for_generation: under FSDP, gather the whole policy once per rollout (fast; needs the full model's
            memory on each device) rather than block by block at every decoding step (``sharding.gathered``).

    Image-text models (a folder whose config is a transformers image-text-to-text model, e.g. Qwen2-VL/Qwen2.5-VL)
    load with their processor; batches then carry an ``image`` column (one PIL image, or a list, per prompt) and
    prompts already hold the processor's image placeholders. Images are processed once per prompt, their tensors
    repeated per generation as per-sample blocks and passed unchanged to every log-prob pass (spec §5).
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m-instruct",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        num_generations: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "grpo",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        beta: float = 0.0,
        num_iterations: int = 1,
        entropy_schedule: EntropySchedule | str | dict[str, Any] | None = MaxToMin(),  # stateless, safe to share
        rewards: list[RewardSpec] | None = None,
        reward_weights: list[float] | None = None,
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        total_steps: int | None = None,
        entropy_chunk_size: int = 128,
        max_grad_norm: float | None = 1.0,
        freeze_vision: bool = True,
        zero_reward_patience: int | None = 10,
        optimizer: OptimizerCallable | None = None,
        gather_for_generation: bool = True,
    ):
        super().__init__()
        check_model_source(model_name_or_path, option="model_name_or_path")
        _require(dtype in DTYPES, "dtype", dtype, str(sorted(DTYPES)))
        _require(isinstance(num_generations, int) and num_generations >= 2, "num_generations", num_generations,
                 "an int >= 2 (group normalisation needs at least two completions per prompt)")  # fmt: skip
        _require(math.isfinite(temperature) and temperature > 0, "temperature", temperature, "a finite float > 0")
        _require(0 < top_p <= 1, "top_p", top_p, "a float in (0, 1]")
        _require(max_new_tokens >= 1, "max_new_tokens", max_new_tokens, "an int >= 1")
        check_choice("scale_rewards", scale_rewards, AdvantageScale)
        _require(num_iterations >= 1, "num_iterations", num_iterations, "an int >= 1")
        _require(learning_rate > 0, "learning_rate", learning_rate, "a float > 0")
        _require(weight_decay >= 0, "weight_decay", weight_decay, "a float >= 0")
        _require(total_steps is None or total_steps >= 1, "total_steps", total_steps, "None or an int >= 1")
        _require(entropy_chunk_size >= 1, "entropy_chunk_size", entropy_chunk_size, "an int >= 1")
        _require(max_grad_norm is None or max_grad_norm > 0, "max_grad_norm", max_grad_norm, "None or a float > 0")
        _require(zero_reward_patience is None or zero_reward_patience >= 1, "zero_reward_patience",
                 zero_reward_patience, "None or an int >= 1")  # fmt: skip
        # GRPOLossConfig validates loss_type, epsilon_low/high and beta with the same kind of message.
        self.loss_config = GRPOLossConfig(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                                          beta=beta, max_completion_length=max_new_tokens)  # fmt: skip
        try:  # re-raised so that the message starts with the option the user wrote
            self.entropy_schedule = schedule_from_config(entropy_schedule)
        except ValueError as err:
            raise ValueError(f"entropy_schedule={entropy_schedule!r}: {err}") from err
        try:
            self.reward_set = RewardSet(["accuracy"] if rewards is None else rewards, reward_weights)
        except ValueError as err:
            raise ValueError(f"rewards={rewards!r}, reward_weights={reward_weights!r}: {err}") from err
        if top_p < 1:
            warnings.warn(f"top_p={top_p} < 1: sampling no longer follows softmax(z/T), which the loss and entropy "
                          "assume (spec §2.1).", stacklevel=2)  # fmt: skip
        # Schedules and callables are not YAML-serialisable: store their names/arguments instead.
        self.save_hyperparameters(ignore=["entropy_schedule", "rewards", "optimizer"])
        self.hparams["entropy_schedule"] = self.entropy_schedule.hparams()
        self.hparams["rewards"] = [r if isinstance(r, (str, dict)) else reward_name(r) for r in rewards or
                                   ["accuracy"]]  # fmt: skip
        self.model_name_or_path, self.dtype_name = model_name_or_path, dtype
        self.num_generations, self.temperature, self.top_p = num_generations, temperature, top_p
        self.max_new_tokens, self.scale_rewards, self.num_iterations = max_new_tokens, scale_rewards, num_iterations
        self.learning_rate, self.weight_decay, self.total_steps = learning_rate, weight_decay, total_steps
        self.entropy_chunk_size, self.max_grad_norm, self.freeze_vision = entropy_chunk_size, max_grad_norm, freeze_vision
        self.zero_reward_watch = ZeroRewardWatch(zero_reward_patience)
        self.optimizer_factory, self.gather_for_generation = optimizer, gather_for_generation
        # Manual optimisation (spec §1.4): generation, μ optimizer steps per generated batch and the loss scaling
        # are ours to control; automatic optimisation allows one step per training_step and would also re-run
        # training_step (i.e. re-generate) inside the optimizer closure.
        self.automatic_optimization = False
        self.model: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.excluded_tokens: list[int] = []
        self._tokenizer = None
        self._processor = None
        self._schedule_total: int | None = None  # S, resolved at train start or restored from a checkpoint
        self._ckpt_total: int | None = None
        self._stage: str | None = None
        self.val_clean_acc = MeanMetric()
        self.clean_acc_history: list[tuple[int, float]] = []  # (optimizer step, val/clean_acc), for the summary

    # -- loading -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        refuse_unsupported_strategy(self.trainer.strategy)  # Lightning calls setup before configure_model

    def configure_model(self) -> None:
        """Load the policy (and, for β > 0 only, a frozen reference copy) lazily, after option validation."""
        if self.model is not None:
            return
        folder = resolve_model(self.model_name_or_path, option="model_name_or_path")
        self.model = load_policy(folder, DTYPES[self.dtype_name])
        # Outside the policy's support: never sampled, and excluded from every log-prob / entropy (rollout.generate).
        self.excluded_tokens = placeholder_token_ids(self.model)
        if self.freeze_vision and self.is_multimodal:
            freeze_vision_tower(self.model)
        if self.loss_config.beta > 0:
            # A copy of the freshly loaded weights *is* the reference policy; it sits in the state dict so that a
            # resumed run compares against the same reference without re-deriving it.
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self._trainer is not None and is_fsdp(self.trainer.strategy):
            self.model = shard(self.model, self.trainer.strategy)
            self.ref_model = shard(self.ref_model, self.trainer.strategy) if self.ref_model is not None else None

    @property
    def is_multimodal(self) -> bool:
        """Whether the policy is an image-text model (it then takes an ``image`` column through its processor)."""
        return is_image_text_model(resolve_model(self.model_name_or_path))

    @property
    def processor(self):
        """The image-text model's processor (``None`` for a text-only policy)."""
        if self._processor is None and self.is_multimodal:
            from lit_modules.vlm.processor import load_processor

            self._processor = load_processor(resolve_model(self.model_name_or_path))
        return self._processor

    @property
    def tokenizer(self):
        """The model folder's tokenizer (the processor's, for image-text models), left-padding, EOS as pad token
        when it defines none."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            processor = self.processor
            tok = processor.tokenizer if processor is not None else AutoTokenizer.from_pretrained(
                resolve_model(self.model_name_or_path))  # fmt: skip
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def on_fit_start(self) -> None:
        # transformers 5 loads models in eval mode, and Lightning restores each submodule's own mode rather than
        # forcing train(): switch the policy explicitly (the reference copy stays in eval mode on purpose).
        self.model.train()

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)

    # -- one training step ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        started = time.perf_counter()
        rollout = self.sample(batch["prompt"], do_sample=True, repeats=self.num_generations, images=batch.get("image"))
        generated = time.perf_counter()
        columns = self._reward_columns(batch, rollout)
        old_logp = None
        if self.num_iterations > 1 or self.reward_set.needs_model_stats:
            old_logp = self._model_stats(rollout, columns)
        ref_logp = self._ref_logp(rollout) if self.loss_config.beta > 0 else None
        scores = self.reward_set.scores(list(repeat_column(batch["prompt"], self.num_generations)),
                                        rollout.completions, **columns)  # fmt: skip
        rewards = weighted_sum(scores, self.reward_set.weights)
        self.zero_reward_watch.update(rewards, self.trainer.global_step)
        advantages = group_advantages(rewards, self.num_generations, self.scale_rewards).to(self.device)
        first_coef, outputs = self.entropy_coef(), []
        for _ in range(self.num_iterations):
            outputs.append(self._optimizer_step(rollout, advantages, old_logp, ref_logp))
        # Wall time of the two halves of a step (on an accelerator they include its queue: generate() syncs, and
        # the float() of the metrics below waits for the updates).
        timing = {"timing/generation_seconds": generated - started,
                  "timing/update_seconds": time.perf_counter() - generated}
        self._log_step(batch, rollout, rewards, scores, outputs, first_coef, timing)

    def sample(self, prompts: Sequence[str], *, do_sample: bool, repeats: int, images: Sequence | None = None
               ) -> Rollout:  # fmt: skip
        """Tokenise (left-padded; images through the processor, once), expand each prompt ``repeats`` times,
        generate and mask the completions."""
        if images is not None:
            if self.processor is None:
                raise ValueError(f"the batch has an 'image' column but model_name_or_path={self.model_name_or_path!r} "
                                 "is a text-only model; allowed: an image-text model folder (e.g. Qwen2-VL)")
            ids, mask, image_inputs = image_prompts(self.processor, prompts, images, repeats, self.model)
        else:
            ids, mask = tokenize_prompts(self.tokenizer, prompts, self.device)
            ids, mask, image_inputs = ids.repeat_interleave(repeats, dim=0), mask.repeat_interleave(repeats, dim=0), {}
        eos = eos_token_ids(self.model, self.tokenizer)
        with gathered(self.model, self.gather_for_generation) as lockstep:
            completion_ids = generate(self.model, ids, mask, eos=eos, pad=self.tokenizer.pad_token_id,
                                      max_new_tokens=self.max_new_tokens, do_sample=do_sample,
                                      temperature=self.temperature, top_p=self.top_p, image_inputs=image_inputs,
                                      suppress=self.excluded_tokens, lockstep=lockstep)  # fmt: skip
        completion_mask, truncated = first_eos_mask(completion_ids, eos)
        texts = decode(self.tokenizer, completion_ids, completion_mask)
        return Rollout(ids, mask, completion_ids, completion_mask, texts, truncated, image_inputs)

    def _reward_columns(self, batch: dict[str, Any], rollout: Rollout) -> dict[str, Any]:
        """Dataset columns repeated per completion, minus the eval-only ones, plus the module's columns (§3.1)."""
        # ``prompt`` is left out: rewards receive the prompts as their first positional argument.
        columns = {k: repeat_column(v, self.num_generations) for k, v in reward_columns(batch).items()
                   if k != "prompt"}  # fmt: skip
        n = rollout.completion_ids.shape[0]
        columns.update(group_ids=[i // self.num_generations for i in range(n)],
                       completion_ids=rollout.completion_ids.cpu(), completion_mask=rollout.completion_mask.cpu(),
                       global_step=self.trainer.global_step)  # fmt: skip
        return columns

    def token_stats(self, model: torch.nn.Module, rollout: Rollout, *, entropy: bool = True,
                    entropy_grad: bool = True, self_certainty: bool = False):  # fmt: skip
        """Per-token ℓ/H (/SC) of the rollout's completion tokens under ``model`` (temperature-scaled logits)."""
        logits = completion_logits(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                   rollout.completion_mask, rollout.image_inputs)  # fmt: skip
        excluded = torch.tensor(self.excluded_tokens, device=logits.device) if self.excluded_tokens else None
        return token_stats(logits, rollout.completion_ids, rollout.completion_mask, self.temperature,
                           entropy=entropy, entropy_grad=entropy_grad, self_certainty=self_certainty,
                           chunk_size=self.entropy_chunk_size, excluded=excluded)  # fmt: skip

    @torch.no_grad()
    def _model_stats(self, rollout: Rollout, columns: dict[str, Any]) -> torch.Tensor | None:
        """ℓ_old before the update (kept only for μ > 1); adds the CPU per-token stats rewards may ask for."""
        stats = self.token_stats(self.model, rollout, entropy=self.reward_set.needs_model_stats,
                                 self_certainty=self.reward_set.needs_model_stats)  # fmt: skip
        if self.reward_set.needs_model_stats:
            columns.update(token_logp=stats.logp.cpu(), token_entropy=stats.entropy.cpu(),
                           token_self_certainty=stats.self_certainty.cpu())  # fmt: skip
        return stats.logp if self.num_iterations > 1 else None

    @torch.no_grad()
    def _ref_logp(self, rollout: Rollout) -> torch.Tensor:
        self.ref_model.eval()  # Lightning's .train() on the module reaches the reference copy too
        return self.token_stats(self.ref_model, rollout, entropy=False).logp

    def compute_loss(self, rollout: Rollout, advantages: torch.Tensor, entropy_coef: float, *,
                     old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                     tokens_per_rank: float | None = None) -> GRPOLossOutput:  # fmt: skip
        """The policy's loss on a rollout; entropy carries gradient only when λ ≠ 0 (else it is only logged)."""
        stats = self.token_stats(self.model, rollout, entropy_grad=entropy_coef != 0)
        return grpo_loss(stats.logp, rollout.completion_mask, advantages, self.loss_config, old_logp=old_logp,
                         ref_logp=ref_logp, entropy=stats.entropy, entropy_coef=entropy_coef,
                         tokens_per_rank=tokens_per_rank)  # fmt: skip

    def _optimizer_step(self, rollout: Rollout, advantages: torch.Tensor, old_logp, ref_logp) -> GRPOLossOutput:
        """One update: λ read at this step's global_step, backward, clip, step."""
        coef = self.entropy_coef()
        self._announce_stage(coef)
        out = self.compute_loss(rollout, advantages, coef, old_logp=old_logp, ref_logp=ref_logp,
                                tokens_per_rank=self._dapo_tokens_per_rank(rollout))  # fmt: skip
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(out.loss)
        if self.max_grad_norm is not None and is_sharded(self.model):
            # FSDP's own clipping: the global norm over every rank's shard (a plain norm would see one shard).
            self.model.clip_grad_norm_(self.max_grad_norm)
        elif self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        return out

    def _dapo_tokens_per_rank(self, rollout: Rollout) -> float | None:
        """``dapo`` divides by the step's global token count / W (one all-reduce); other types need nothing."""
        world = self.trainer.world_size
        if self.loss_config.loss_type != "dapo" or world == 1:
            return None
        local = rollout.completion_mask.sum().to(torch.float32)
        return float(self.trainer.strategy.reduce(local, reduce_op="sum")) / world

    def _announce_stage(self, coef: float) -> None:
        """Log a line whenever the active phase changes (explore / exploit / off)."""
        stage = stage_label(coef)
        if stage != self._stage:
            log.info("step %d: entropy coefficient %.3g, %s", self.trainer.global_step, coef, stage)
            self._stage = stage

    # -- metrics -------------------------------------------------------------------------------------
    def _log_step(self, batch, rollout: Rollout, rewards, scores, outputs: list[GRPOLossOutput],
                  first_coef: float, timing: dict[str, float]) -> None:  # fmt: skip
        metrics = step_metrics(batch, rollout, rewards, scores, self.reward_set.names, outputs, first_coef, timing,
                               self.num_generations)  # fmt: skip
        # No sync_dist: per-step collectives would stall every rank; loggers record rank 0's values.
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if math.isfinite(v)}, on_step=True,
                      on_epoch=False, batch_size=len(batch["prompt"]))  # fmt: skip

    # -- validation: greedy decoding scored against clean labels ------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.sample(batch["prompt"], do_sample=False, repeats=1, images=batch.get("image"))
        labels = batch["clean_label"] if "clean_label" in batch else batch["label"]
        counted = batch.get("counted", [True] * len(labels))  # padding rows even out the ranks' generate calls
        scores = [s for s, c in zip(label_scores(rollout.completions, labels), counted) if s is not None and c]
        if scores:
            self.val_clean_acc.update(torch.tensor(scores, device=self.device))
        # A torchmetrics object syncs once when computed at epoch end: no collective per batch.
        self.log("val/clean_acc", self.val_clean_acc, on_step=False, on_epoch=True, batch_size=max(len(scores), 1))

    def on_validation_epoch_end(self) -> None:
        """Print clean accuracy at every validation (the sanity check counts: it is the "before" number)."""
        if self.val_clean_acc.update_count == 0:
            return
        acc, step = float(self.val_clean_acc.compute()), self.trainer.global_step  # compute() syncs across ranks
        self.clean_acc_history.append((step, acc))
        rank_zero_info(f"val/clean_acc at step {step}: {acc:.3f}" + (" (before training)" if step == 0 else ""))

    def on_fit_end(self) -> None:
        if len(self.clean_acc_history) >= 2:
            (first_step, first), (last_step, last) = self.clean_acc_history[0], self.clean_acc_history[-1]
            rank_zero_info(f"clean accuracy: {first:.3f} at step {first_step} -> {last:.3f} at step {last_step} "
                           f"({last - first:+.3f})")
