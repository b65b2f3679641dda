"""The image path of GRPOModule on tiny random Qwen2-VL / Qwen2.5-VL models with locally built processors.

What must hold (spec §5, tests 17-18): images are processed once, repeated per generation as per-sample blocks, and
every log-prob pass sees exactly the image tensors generation used, so that the training pass reproduces the logits
of generation time and pairs each completion with its own prompt's image.
"""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer

from datamodules.image_tasks import generate_images
from datamodules.rlvr import RLVRDataModule
from lit_modules.grpo.module import GRPOModule
from lit_modules.grpo.rollout import completion_logits

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def _module(folder, **kwargs) -> GRPOModule:
    module = GRPOModule(model_name_or_path=str(folder), **{**dict(num_generations=3, max_new_tokens=5), **kwargs})
    module.configure_model()
    return module


def _prompts(module, records):
    processor = module.processor
    return [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                            {"type": "text", "text": r["question"]}]}],
                                          add_generation_prompt=True, tokenize=False) for r in records]  # fmt: skip


class InputRecorder:
    """Forward pre-hook on the model: the image tensors of every call (generate's prefill, log-prob passes)."""

    def __init__(self, model):
        self.calls: list[dict[str, torch.Tensor]] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            self.calls.append({k: kwargs[k].clone() for k in ("pixel_values", "image_grid_thw")})


@pytest.mark.parametrize("family", FAMILIES)
def test_log_prob_pass_sees_the_images_generation_used_and_reproduces_its_logits(tiny_vlm_dir, family):
    module = _module(tiny_vlm_dir(family), temperature=0.7)
    records = generate_images("grounding", 2, seed=3)  # two different images
    recorder = InputRecorder(module.model)
    torch.manual_seed(0)
    rollout = module.sample(_prompts(module, records), do_sample=True, repeats=3, images=[r["image"] for r in records])

    # Rows are [s0, s0, s0, s1, s1, s1]: each sample's 64 patch rows repeated as a block.
    rows = rollout.image_inputs["pixel_values"].shape[0] // 6
    blocks = rollout.image_inputs["pixel_values"].view(6, rows, -1)
    assert all(torch.equal(blocks[i], blocks[0]) for i in range(3)) and not torch.equal(blocks[0], blocks[3])
    assert torch.equal(blocks[3], blocks[5])

    # Generation time: the raw logits of each sampled token, from the same expanded tensors.
    with torch.no_grad():
        generated = module.model.generate(input_ids=rollout.prompt_ids, attention_mask=rollout.prompt_mask,
                                          **rollout.image_inputs, max_new_tokens=rollout.completion_ids.shape[1],
                                          do_sample=False, output_logits=True, return_dict_in_generate=True,
                                          eos_token_id=[], pad_token_id=module.tokenizer.pad_token_id)  # fmt: skip
    greedy = generated.sequences[:, rollout.prompt_ids.shape[1]:]
    gen_logits = torch.stack(generated.logits, dim=1)
    mask = torch.ones_like(greedy, dtype=torch.bool)
    with torch.no_grad():
        pass_logits = completion_logits(module.model, rollout.prompt_ids, rollout.prompt_mask, greedy, mask,
                                        rollout.image_inputs)  # fmt: skip
    torch.testing.assert_close(pass_logits, gen_logits, atol=1e-4, rtol=1e-4)

    # The log-prob pass of the training step gets exactly the tensors generation got (the prefill call).
    recorder.calls.clear()
    module.token_stats(module.model, rollout, entropy=False)
    assert len(recorder.calls) == 1
    for key, value in recorder.calls[0].items():
        assert torch.equal(value, rollout.image_inputs[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_is_scored_against_its_own_image(tiny_vlm_dir, family):
    """Batched (left-padded, expanded) logits equal those of each prompt run alone with its own image."""
    module = _module(tiny_vlm_dir(family))
    records = generate_images("count", 2, seed=1)
    images = [r["image"] for r in records]
    rollout = module.sample(_prompts(module, records), do_sample=True, repeats=2, images=images)
    with torch.no_grad():
        batched = completion_logits(module.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                    rollout.completion_mask, rollout.image_inputs)  # fmt: skip
        for row in range(4):
            alone = module.sample([_prompts(module, records)[row // 2]], do_sample=False, repeats=1,
                                  images=[images[row // 2]])  # fmt: skip
            logits = completion_logits(module.model, alone.prompt_ids, alone.prompt_mask,
                                       rollout.completion_ids[row:row + 1], rollout.completion_mask[row:row + 1],
                                       alone.image_inputs)  # fmt: skip
            keep = rollout.completion_mask[row]
            torch.testing.assert_close(batched[row][keep], logits[0][keep], atol=1e-4, rtol=1e-4)


def test_a_log_prob_pass_without_the_image_grid_is_detected(tiny_vlm_dir):
    module = _module(tiny_vlm_dir("qwen2_vl"))
    records = generate_images("grounding", 1, seed=0)
    rollout = module.sample(_prompts(module, records), do_sample=False, repeats=2, images=[records[0]["image"]])
    inputs = {k: v for k, v in rollout.image_inputs.items() if k != "image_grid_thw"}
    with pytest.raises(ValueError, match="image_grid_thw"), torch.no_grad():
        completion_logits(module.model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                          rollout.completion_mask, inputs)  # fmt: skip


def test_image_token_mismatch_is_refused_before_generation(tiny_vlm_dir):
    module = _module(tiny_vlm_dir("qwen2_vl"))
    records = generate_images("grounding", 2, seed=0)
    prompts = _prompts(module, records)
    with pytest.raises(ValueError, match="image"):  # two prompts with placeholders, one image
        module.sample(prompts, do_sample=False, repeats=1, images=[records[0]["image"], None])


def test_text_only_policy_refuses_an_image_column(tiny_model_dir):
    module = GRPOModule(model_name_or_path=str(tiny_model_dir("llama")), num_generations=2, max_new_tokens=2)
    module.configure_model()
    with pytest.raises(ValueError, match="text-only"):
        module.sample(["x"], do_sample=False, repeats=1, images=[None])


def test_fit_on_generated_grounding_trains_the_language_model_only(tiny_vlm_dir):
    folder = tiny_vlm_dir("qwen2_vl")
    module = _module(folder, learning_rate=1e-2, num_generations=2)
    vision = {n: p.detach().clone() for n, p in module.model.named_parameters() if ".visual." in f".{n}"}
    text = {n: p.detach().clone() for n, p in module.model.named_parameters() if "language_model" in n}
    assert vision and text and not any(p.requires_grad for n, p in module.model.named_parameters() if n in vision)
    data = RLVRDataModule(source="image_grounding", num_train=4, num_val=2, noise_rate=0.5, prompts_per_batch=2,
                          tokenizer=str(folder))  # fmt: skip
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                      enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2
    params = dict(module.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in vision.items())
    assert any(not torch.equal(params[n], v) for n, v in text.items())
    assert "val/clean_acc" in trainer.callback_metrics


def test_the_policy_never_emits_image_placeholders_and_its_log_probs_exclude_them(tiny_vlm_dir):
    """A sampled <|image_pad|> would add an image token without features to every later pass. With the placeholder's
    logit pushed far up, generation still never emits one, and the log-prob pass renormalises over the rest."""
    module = _module(tiny_vlm_dir("qwen2_vl"), num_generations=4, max_new_tokens=6)
    image_token = module.model.config.image_token_id
    assert image_token in module.excluded_tokens
    module.model.lm_head.register_forward_hook(lambda mod, args, out: out.index_add(
        -1, torch.tensor([image_token]), torch.full((*out.shape[:-1], 1), 50.0)))  # fmt: skip
    records = generate_images("grounding", 2, seed=5)
    rollout = module.sample(_prompts(module, records), do_sample=True, repeats=4, images=[r["image"] for r in records])
    assert not torch.isin(rollout.completion_ids, torch.tensor(module.excluded_tokens)).any()
    stats = module.token_stats(module.model, rollout)
    assert torch.isfinite(stats.logp[rollout.completion_mask]).all()
    assert torch.isfinite(stats.entropy[rollout.completion_mask]).all()
