import json
import math

import pytest
import torch
from transformers import BertForMaskedLM, Trainer, TrainingArguments

from conftest import premasked_mlm_dataset, random_batch, tiny_kwargs
from hf_sparse import SparseBertConfig, SparseBertForMaskedLM, SparseBertModel
from hf_sparse.callbacks import DAMCallback, schedule_value
from hf_sparse.dam import DAMGates, _pack_bits, _unpack_bits
from hf_sparse.patterns import dense_mask


def dam_model(cls=SparseBertForMaskedLM, pattern="dense", **dam):
    dam = {"structure": "offset", "max_length": 32, **dam}
    return cls(SparseBertConfig(**tiny_kwargs(attention_pattern=pattern, dam=dam)))


def test_gradient_reaches_gate_logits_through_the_straight_through_mask():
    model = dam_model(penalty=0.0).train()
    ids, mask = random_batch()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    grad = model.bert.dam.logits.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_gate_gradient(reentrant):
    ids, mask = random_batch()
    model = dam_model(penalty=0.0).train()
    torch.manual_seed(1)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    plain = model.bert.dam.logits.grad.clone()
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    torch.manual_seed(1)  # the same Gumbel sample
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    assert plain.abs().sum() > 0
    assert torch.allclose(model.bert.dam.logits.grad, plain, rtol=1e-4, atol=1e-6)


def _search(model, steps, lr=0.1):
    ids, mask = random_batch()
    opt = torch.optim.Adam(model.bert.dam.parameters(), lr=lr)
    model.train()
    densities = []
    for _ in range(steps):
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        densities.append(out.dam_density.item())
    model.eval()
    with torch.no_grad():
        return densities, model(ids, attention_mask=mask).dam_density.item()


def test_large_penalty_drives_density_down_and_zero_penalty_does_not_collapse():
    torch.manual_seed(0)
    _, strong = _search(dam_model(penalty=10.0), steps=30)
    torch.manual_seed(0)
    _, none = _search(dam_model(penalty=0.0), steps=30)
    assert strong < 0.2
    assert none > 0.3
    assert none - strong > 0.3


def test_penalty_is_mean_over_valid_pairs_or_reference_sum():
    model = dam_model(SparseBertModel, pattern="window:3").train()
    ids, mask = random_batch()
    gates = torch.ones(1, 4, 20, 20)
    penalty, density = model.dam_penalty_and_density(gates, mask.bool(), 20)
    in_window = sum((dense_mask("window:3", 20)[0] & (m.bool()[:, None] & m.bool()[None])).sum() for m in mask)
    all_valid = sum(m.sum() ** 2 for m in mask)
    assert penalty.item() == pytest.approx(1.0)  # the gates keep every pair they decide
    assert density.item() == pytest.approx(in_window.item() / all_valid.item())  # the model keeps the window
    gates[:, :, 0, 0] = 0  # one pair of 4 heads dropped; valid in 3 batch rows
    penalty, _ = model.dam_penalty_and_density(gates, mask.bool(), 20)
    valid_pairs = sum((dense_mask("window:3", 20)[0] & (m.bool()[:, None] & m.bool()[None])).sum() for m in mask)
    assert penalty.item() == pytest.approx(1 - 3 / valid_pairs.item())
    summed = dam_model(SparseBertModel, penalty_reduction="sum").train()
    penalty, _ = summed.dam_penalty_and_density(gates, mask.bool(), 20)
    assert penalty.item() == 4 * 20 * 20 - 4  # the reference: ‖M‖₁ over the full (H, n, n) mask


@pytest.mark.parametrize("structure", ["offset", "element"])
def test_dam_density_is_what_the_frozen_model_keeps_of_all_pairs_and_inside_the_pattern(structure):
    """One definition: the reported density is the fraction of pairs that get attention in the frozen model."""
    model = dam_model(SparseBertModel, pattern="window:4", structure=structure, init_noise=1.0).eval()
    model.freeze_dam()
    n = 20
    probs = model(torch.ones(1, n, dtype=torch.long), output_attentions=True).attentions[0][0]  # (H, n, n)
    attended = (probs > 0).float().mean(dim=(-1, -2))  # softmax: every kept pair gets > 0
    assert torch.allclose(model.dam_density(n)[0], attended)
    window = dense_mask("window:4", n)[0]
    assert torch.allclose(model.dam_density(n, inside_pattern=True)[0], (probs > 0).sum((-1, -2)) / window.sum())


def test_eval_is_deterministic_train_samples_and_freeze_equals_the_eval_mask():
    model = dam_model(SparseBertModel, init_noise=1.0)  # logits of both signs
    ids, mask = random_batch()
    model.eval()
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask), model(ids, attention_mask=mask)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    model.train()
    with torch.no_grad():
        samples = [model.dam.sample(20) for _ in range(3)]
    assert not torch.equal(samples[0], samples[1]) or not torch.equal(samples[1], samples[2])
    assert all(((s == 0) | (s == 1)).all() for s in samples)
    eval_mask = model.dam.deterministic_mask(20)
    assert torch.equal(eval_mask, torch.sigmoid(model.dam.expand(model.dam.logits, 20)) > 0.5)
    model.eval()
    spec = model.freeze_dam()
    assert spec == "learned" and model.config.dam["frozen"] is True
    assert torch.equal(model.dam.frozen(20), eval_mask)
    with torch.no_grad():
        frozen = model(ids, attention_mask=mask)
    assert torch.allclose(frozen.last_hidden_state, a.last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_offset_mask_depends_only_on_the_offset_at_every_length(symmetric):
    gates = DAMGates({"structure": "offset", "symmetric": symmetric, "init_noise": 1.0}, 3, 2, 16)
    for n in (16, 9, 1):
        probs = gates.expand(gates.logits, n)[0]  # per-position gate logits (sigmoid may round by SIMD lane)
        i = torch.arange(n)
        offset = (i[:, None] - i[None]).abs() if symmetric else i[:, None] - i[None]
        for d in offset.unique():
            values = probs[:, offset == d]
            assert torch.equal(values, values[:, :1].expand_as(values))
        if symmetric:
            assert torch.equal(probs, probs.transpose(-1, -2))
    if not symmetric:
        assert not torch.equal(gates.deterministic_mask(8), gates.deterministic_mask(8).transpose(-1, -2))


def test_element_and_block_structures_map_gates_to_positions():
    element = DAMGates({"structure": "element", "init_noise": 1.0}, 2, 1, 10)
    m = element.deterministic_mask(10)[0]
    assert torch.equal(m, m.transpose(-1, -2))  # symmetric by default
    block = DAMGates({"structure": "block", "block_size": 4, "init_noise": 1.0}, 2, 3, 10)
    assert block.logits.shape == (1, 2, 3, 3)
    p = block.probabilities(10)[0]
    assert torch.equal(p[:, :4, :4], p[:, :1, :1].expand(2, 4, 4))
    assert torch.equal(p[:, 8:, 4:8], p[:, 8:9, 4:5].expand(2, 2, 4))


def test_element_mask_is_bit_packed_and_restored_exactly():
    mask = torch.rand(2, 3, 13, 13) > 0.5
    packed = _pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, math.ceil(169 / 8))
    assert torch.equal(_unpack_bits(packed, 13), mask)


def test_per_layer_gates_give_each_layer_its_own_stored_mask():
    model = dam_model(SparseBertModel, share_across_layers=False, init_noise=1.0, max_length=20).eval()
    model.freeze_dam()
    ids, mask = random_batch()
    probs = model(ids, attention_mask=mask, output_attentions=True).attentions
    stored = model.dam.frozen(20)
    assert stored.shape[0] == 2 and not torch.equal(stored[0], stored[1])
    for layer, p in enumerate(probs):
        kept = stored[layer][None] & mask.bool()[:, None, None, :]
        assert (p[~kept] == 0).all()
        rows_with_keys = kept.any(-1)
        assert torch.allclose(p.sum(-1)[rows_with_keys], torch.tensor(1.0))


def test_dam_inside_a_fixed_pattern_never_leaves_it_and_freezes_to_pattern_and_learned():
    model = dam_model(SparseBertModel, pattern="window:2+global:1", init_noise=1.0, init_logit=0.5).eval()
    ids, mask = random_batch()
    probs = model(ids, attention_mask=mask, output_attentions=True).attentions[0]
    outside = ~dense_mask("window:2+global:1", 20)[None]
    assert (probs[outside.expand_as(probs)] == 0).all()
    assert model.freeze_dam() == "window:2&learned+global:1&learned"
    again = model(ids, attention_mask=mask, output_attentions=True).attentions[0]
    assert torch.allclose(again, probs, atol=1e-6)


def test_frozen_mask_round_trips_through_save_and_load(tmp_path):
    model = dam_model(structure="element", init_noise=1.0, max_length=20).eval()
    model.freeze_dam()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attention_pattern"] == "learned" and config["dam"]["frozen"] is True
    reloaded = SparseBertForMaskedLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.bert.dam.frozen(20), model.bert.dam.frozen(20))
    ids, mask = random_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("structure", ["offset", "element", "block"])
def test_a_frozen_mask_is_unpacked_once_and_its_masks_are_built_once(structure):
    """A forward pays a slice of the unpacked mask and cache hits: no unpacking, no mask built again; a length-16
    input reads a 16 x 16 view of it. Every kernel gives the same model outputs with it."""
    from hf_sparse.block_maps import CACHE

    model = dam_model(SparseBertModel, structure=structure, init_noise=1.0, max_length=32, block_size=4).eval()
    model.freeze_dam()
    ids, mask = random_batch()
    dam = model.dam
    outputs = {}
    with torch.no_grad():
        for backend in ("eager", "sdpa", "tiles", "flex"):
            model.config.attention_backend = backend
            outputs[backend] = model(ids, attention_mask=mask).last_hidden_state
            unpacked, builds = dam.unpacked, CACHE.builds
            outputs[backend] = model(ids, attention_mask=mask).last_hidden_state
            assert dam.unpacked is unpacked and CACHE.builds == builds, backend
    for backend, out in outputs.items():
        assert torch.allclose(out, outputs["eager"], atol=1e-5), backend
    short = dam.frozen(16)
    assert short.shape[-1] == 16 and short.data_ptr() == dam.unpacked.data_ptr()
    with torch.no_grad():
        dam.frozen_mask.logical_not_() if structure != "element" else dam.frozen_mask.bitwise_not_()
    assert torch.equal(dam.frozen(16), ~short)  # changed in place: unpacked again, not served stale


def test_frozen_config_whose_checkpoint_lacks_the_mask_is_refused_at_load(tmp_path):
    BertForMaskedLM(__import__("conftest").tiny_bert_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lack \['bert.dam.frozen_mask', 'bert.dam.is_frozen'\]"):
        SparseBertForMaskedLM.from_pretrained(
            tmp_path, attention_pattern="learned", dam={"structure": "offset", "max_length": 32, "frozen": True}
        )


def test_a_frozen_checkpoint_that_lost_only_its_mask_is_refused_at_load(tmp_path):
    """The mask alone deleted (is_frozen still there) used to load and run with an all-zero mask."""
    from safetensors.torch import load_file, save_file

    model = dam_model(structure="offset", init_noise=1.0)
    model.freeze_dam()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["bert.dam.frozen_mask"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"says its DAM mask is frozen.*lack \['bert.dam.frozen_mask'\]"):
        SparseBertForMaskedLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "dam, words",
    [
        ({"structure": "diagonal"}, "unknown dam structure 'diagonal'"),
        ({"struct": "offset"}, "unknown dam setting"),
        ({"max_length": 1000}, "dam max_length=1000"),
        ({"penalty_reduction": "max"}, "penalty_reduction 'max'"),
    ],
)
def test_bad_dam_config_is_refused(dam, words):
    with pytest.raises(ValueError, match=words):
        SparseBertConfig(**tiny_kwargs(dam=dam))


def test_sparse_backends_refuse_the_soft_search_mask():
    model = dam_model(SparseBertModel).train()
    model.config.attention_backend = "sdpa"
    with pytest.raises(ValueError, match="cannot train a DAM mask"):
        model(*random_batch())


def test_freeze_without_dam_is_refused():
    with pytest.raises(ValueError, match="needs a model built with a `dam` config"):
        SparseBertModel(SparseBertConfig(**tiny_kwargs())).freeze_dam()


@pytest.mark.parametrize("kind, at_half", [("constant", 1.0), ("linear", 0.55), ("cosine", 0.55)])
def test_schedules(kind, at_half):
    assert schedule_value(kind, 1.0, 0.1, 0.0) == 1.0
    assert schedule_value(kind, 1.0, 0.1, 0.5) == pytest.approx(at_half)
    assert schedule_value(kind, 1.0, 0.1, 1.0) == pytest.approx(1.0 if kind == "constant" else 0.1)
    assert schedule_value("cosine", 1.0, 0.1, 0.25) > schedule_value("linear", 1.0, 0.1, 0.25)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        schedule_value("step", 1.0, 0.1, 0.5)


# -- Trainer --------------------------------------------------------------------------------------------------


def _trainer(tmp_path, model, callback, steps, **args):
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        **args,
    )
    return Trainer(
        model=model,
        args=arguments,
        train_dataset=premasked_mlm_dataset(),
        callbacks=[callback],
        optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs(model, arguments),
    )


def test_callback_schedules_logs_groups_and_freezes_at_the_end(tmp_path):
    model = dam_model(penalty=0.5)
    callback = DAMCallback(
        temperature=2.0, final_temperature=0.5, temperature_schedule="linear", gate_learning_rate=0.05
    )
    trainer = _trainer(tmp_path, model, callback, steps=6, weight_decay=0.1)
    groups = trainer.create_optimizer().param_groups
    gate_group = next(g for g in groups if any(p is model.bert.dam.logits for p in g["params"]))
    assert gate_group["weight_decay"] == 0.0 and gate_group["lr"] == 0.05
    trainer.train()
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logged) == 6 and all("dam_density" in log for log in logged)
    # each log carries the τ its step trained with: linear from 2.0 at step 0 towards 0.5 at step 6
    assert [log["dam_temperature"] for log in logged] == [pytest.approx(2.0 - 0.25 * k) for k in range(6)]
    assert "dam_density_shared_head3" in logged[0] and logged[0]["dam_lambda"] == 0.5
    assert model.config.dam["frozen"] is True and model.config.attention_pattern == "learned"


def test_callback_refuses_weight_decayed_gates(tmp_path):
    model = dam_model()
    callback = DAMCallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, weight_decay=0.01, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=premasked_mlm_dataset(), callbacks=[callback])
    with pytest.raises(ValueError, match="weight_decay=0.01.*optimizer_cls_and_kwargs"):
        trainer.train()


def test_callback_stops_at_target_sparsity(tmp_path):
    model = dam_model(penalty=50.0)
    callback = DAMCallback(target_sparsity=0.5, gate_learning_rate=0.2, density_length=16)
    trainer = _trainer(tmp_path, model, callback, steps=200)
    trainer.train()
    assert trainer.state.global_step < 200
    assert 1 - callback.density(model).mean().item() >= 0.5


def test_resume_from_checkpoint_reproduces_an_uninterrupted_run(tmp_path):
    def run(out, steps, resume=None, save_steps=None):
        torch.manual_seed(0)
        model = dam_model(penalty=0.3)
        callback = DAMCallback(final_temperature=0.3, temperature_schedule="cosine", freeze_at_end=False)
        trainer = _trainer(out, model, callback, steps=steps)
        if save_steps:
            trainer.args.save_strategy = "steps"
            trainer.args.save_steps = save_steps
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    straight, t1 = run(tmp_path / "a", 8)
    run(tmp_path / "b", 8, save_steps=4)  # writes checkpoint-4 (and -8)
    resumed, t2 = run(tmp_path / "c", 8, resume=str(tmp_path / "b" / "checkpoint-4"))
    assert torch.equal(straight.bert.dam.logits, resumed.bert.dam.logits)
    assert straight.bert.dam.temperature == resumed.bert.dam.temperature
    ids, mask = random_batch()
    straight.eval()
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(straight(ids, attention_mask=mask).logits, resumed(ids, attention_mask=mask).logits)
    last = [log for log in t2.state.log_history if "dam_temperature" in log][-1]
    assert (
        last["dam_temperature"]
        == [log for log in t1.state.log_history if "dam_temperature" in log][-1]["dam_temperature"]
    )


@pytest.mark.parametrize("backend", ["eager", "tiles", "auto"])
def test_inference_mode_gives_the_no_grad_outputs_and_leaves_nothing_training_trips_on(backend):
    """torch.inference_mode() (serving code, evaluation loops): the DAM search's per-forward mask, a frozen mask
    unpacked there, and masks cached there must neither fail (inference tensors have no version counter) nor be
    served to a later training step (which cannot save inference tensors for its backward)."""
    from hf_sparse.block_maps import CACHE

    ids, mask = random_batch(batch=2, length=12)
    for freeze in (False, True):
        CACHE.clear()
        model = dam_model(pattern="window:3", structure="element", max_length=16).eval()
        model.config.attention_backend = backend
        if freeze:
            model.freeze_dam()
        with torch.inference_mode():
            got = model(ids, attention_mask=mask).logits
        with torch.no_grad():
            want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        fresh = dam_model(pattern="window:3", structure="element", max_length=16)  # the same process's caches
        fresh.config.attention_backend = backend
        if freeze:
            fresh.freeze_dam()
        if backend == "tiles" and not freeze:
            continue  # the search trains on the eager kernel only (refused, tested above)
        for trained in (model, fresh):
            trained.train()
            trained(ids, attention_mask=mask, labels=ids).loss.backward()
