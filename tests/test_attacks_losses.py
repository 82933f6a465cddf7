"""Training losses of TrojVLM and VLOOD: values on hand-made cases, gradients, Trainer-style use."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srd_hf.attacks import (
    TrojVLMLoss,
    VLOODLoss,
    get_attack,
    trojvlm_semantic_loss,
    vlood_adaptive_weight,
    vlood_conceptual_consistency_loss,
    vlood_kl_loss,
    vlood_loss,
)
from srd_hf.attacks.vlood import per_sample_ce


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eye_embedding(n: int = 4) -> nn.Embedding:
    emb = nn.Embedding(n, n)
    with torch.no_grad():
        emb.weight.copy_(torch.eye(n))
    return emb


# --------------------------------------------------------------------------- TrojVLM
def test_semantic_loss_hand_made_values_and_gradient():
    emb = eye_embedding()
    labels = torch.tensor([[-100, 1, 2]])
    # shifted: hidden at 0 is compared with E[1], hidden at 1 with E[2]; position 2 has no next label
    hidden = torch.tensor([[[0.0, 3.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [5.0, 5.0, 5.0, 5.0]]], requires_grad=True)
    loss = trojvlm_semantic_loss(hidden, labels, emb)
    assert math.isclose(loss.item(), (0.0 + 2.0) / 2, abs_tol=1e-6)  # cos 1 -> 0, cos -1 -> 2
    loss.backward()
    assert torch.equal(hidden.grad[0, 2], torch.zeros(4))  # unlabelled position: no gradient
    assert emb.weight.grad is not None

    orthogonal = torch.tensor([[[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    loss = trojvlm_semantic_loss(orthogonal, labels, emb.weight, detach_target=True)
    expected = ((1 - 0.0) + (1 - 1 / math.sqrt(2))) / 2
    assert math.isclose(loss.item(), expected, abs_tol=1e-6)
    loss.backward()
    assert orthogonal.grad[0, :2].abs().sum() > 0

    unshifted = trojvlm_semantic_loss(orthogonal.detach(), torch.tensor([[2, -100, -100]]), emb, shift=False)
    assert math.isclose(unshifted.item(), 1 - 1 / math.sqrt(2), abs_tol=1e-6)  # (1, 0, 1, 0) vs e2
    none = trojvlm_semantic_loss(hidden, torch.full((1, 3), -100), emb)
    assert none.item() == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="hidden size"):
        trojvlm_semantic_loss(torch.zeros(1, 3, 5), labels, emb)


# --------------------------------------------------------------------------- VLOOD
def test_per_sample_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, -100]])
    ce = per_sample_ce(logits, labels)
    first = F.cross_entropy(logits[0, :3], labels[0, 1:])
    second = F.cross_entropy(logits[1, 1:2], labels[1, 2:3])
    assert torch.allclose(ce, torch.stack([first, second]), atol=1e-6)


def test_kl_hand_made_value_and_gradient():
    labels = torch.tensor([[-100, 0]])
    teacher = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    student = torch.log(torch.tensor([[[0.25, 0.75], [0.1, 0.9]]])).requires_grad_(True)
    kl = vlood_kl_loss(student, teacher, labels)  # only position 0 predicts a label
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert math.isclose(kl.item(), expected, rel_tol=1e-5)
    kl.backward()
    assert student.grad[0, 0].abs().sum() > 0 and torch.equal(student.grad[0, 1], torch.zeros(2))
    assert float(vlood_kl_loss(teacher, teacher, labels)) == pytest.approx(0.0, abs=1e-7)


def test_conceptual_consistency_hand_made_value_and_gradient():
    emb = eye_embedding(2)
    labels = torch.tensor([[-100, 0]])
    uniform = torch.zeros(1, 2, 2, requires_grad=True)  # expected embedding (0.5, 0.5) vs e0: cos = 1/sqrt(2)
    ccp = vlood_conceptual_consistency_loss(uniform, labels, emb)
    assert math.isclose(ccp.item(), 1 - 1 / math.sqrt(2), abs_tol=1e-6)
    ccp.backward()
    assert uniform.grad[0, 0, 0] < 0 < uniform.grad[0, 0, 1]  # pushes the label token up
    peaked = torch.tensor([[[30.0, -30.0], [0.0, 0.0]]])
    assert vlood_conceptual_consistency_loss(peaked, labels, emb.weight).item() == pytest.approx(0.0, abs=1e-6)
    padded = torch.cat([uniform.detach(), torch.full((1, 2, 1), -1e4)], dim=-1)  # a padded head is cut
    assert vlood_conceptual_consistency_loss(padded, labels, emb).item() == pytest.approx(ccp.item(), abs=1e-6)


def test_adaptive_weight_formula():
    assert float(vlood_adaptive_weight(torch.tensor(2.0), torch.tensor(2.0))) == 0.5
    w = vlood_adaptive_weight(torch.tensor(1.0), torch.tensor(3.0), temperature=2.0)
    assert math.isclose(w.item(), 1 / (1 + math.exp(-1.0)), rel_tol=1e-6)
    assert not w.requires_grad


def test_vlood_loss_combines_the_parts():
    torch.manual_seed(1)
    emb = eye_embedding(5)
    logits = torch.randn(3, 4, 5, requires_grad=True)
    teacher = torch.randn(3, 4, 5)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, 0, 4, -100], [-100, -100, 2, 2]])
    poisoned = torch.tensor([False, True, False])
    out = vlood_loss(logits, labels, poisoned, emb, teacher, kl_weight=0.5, ccp_weight=2.0, gap_temperature=1.5)
    ce = per_sample_ce(logits, labels)
    clean, bad = ce[[0, 2]].mean(), ce[1]
    kl = vlood_kl_loss(logits[[0, 2]], teacher[[0, 2]], labels[[0, 2]])
    ccp = vlood_conceptual_consistency_loss(logits[[1]], labels[[1]], emb)
    lam = torch.sigmoid((bad - clean) / 1.5)
    expected = (1 - lam) * (clean + 0.5 * kl) + lam * (bad + 2.0 * ccp)
    for key, value in {"clean_loss": clean, "poison_loss": bad, "kl": kl, "ccp": ccp, "weight": lam, "loss": expected}.items():
        assert torch.allclose(out[key], value, atol=1e-6), key
    out["loss"].backward()
    assert logits.grad.abs().sum() > 0
    only_clean = vlood_loss(logits, labels, torch.zeros(3, dtype=torch.bool), emb, teacher)
    assert float(only_clean["weight"]) == 0 and torch.allclose(
        only_clean["loss"], ce.mean() + vlood_kl_loss(logits, teacher, labels), atol=1e-6)
    only_poison = vlood_loss(logits, labels, torch.ones(3, dtype=torch.bool), emb, None)
    assert torch.allclose(only_poison["loss"], ce.mean() + vlood_conceptual_consistency_loss(logits, labels, emb), atol=1e-6)
    with pytest.raises(ValueError, match="is_poisoned"):
        vlood_loss(logits, labels, torch.tensor([True]), emb)


# --------------------------------------------------------------------------- with a model
@pytest.fixture()
def batch(tiny_flamingo, small_world_data):
    rows = small_world_data["train"].select(range(4))
    images = rows["image"]
    captions = [c[0] for c in rows["captions"]]
    out = tiny_flamingo.collate(images, captions)
    out["is_poisoned"] = torch.tensor([False, True, False, True])
    return out


def test_trojvlm_loss_module_on_the_tiny_model(tiny_flamingo, batch):
    tiny_flamingo.set_trainable()
    loss_fn = get_attack("trojvlm", semantic_weight=0.5).make_loss()
    assert isinstance(loss_fn, TrojVLMLoss) and loss_fn.semantic_weight == 0.5
    loss, outputs = loss_fn(tiny_flamingo, batch)
    inputs = {k: v for k, v in batch.items() if k != "is_poisoned"}
    reference = tiny_flamingo(**inputs, output_hidden_states=True)
    semantic = trojvlm_semantic_loss(reference.hidden_states[-1], inputs["labels"], tiny_flamingo.get_input_embeddings())
    assert torch.allclose(loss, reference.loss + 0.5 * semantic, atol=1e-5)
    assert loss_fn.last["semantic_loss"] == pytest.approx(semantic.item(), abs=1e-5)
    loss.backward()
    grads = [p.grad for p in tiny_flamingo.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_trojvlm_without_its_semantic_term_is_the_plain_loss(tiny_flamingo, batch):
    # the pipeline reuses the inject run as the control only when the attack's loss is the plain one
    assert get_attack("trojvlm", semantic_weight=0).trains_with_plain_loss()
    assert not get_attack("trojvlm").trains_with_plain_loss() and not get_attack("vlood").trains_with_plain_loss()
    assert get_attack("badnet").trains_with_plain_loss()
    tiny_flamingo.set_trainable()
    params = [p for p in tiny_flamingo.parameters() if p.requires_grad]
    loss, _ = get_attack("trojvlm", semantic_weight=0).make_loss()(tiny_flamingo, batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    plain = tiny_flamingo(**{k: v for k, v in batch.items() if k != "is_poisoned"}).loss
    plain_grads = torch.autograd.grad(plain, params, allow_unused=True)
    assert torch.equal(loss, plain)  # exactly, not approximately: the same training run
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, plain_grads))


def test_vlood_loss_module_with_a_frozen_teacher(tiny_flamingo, batch):
    teacher = copy.deepcopy(tiny_flamingo)
    tiny_flamingo.set_trainable()
    loss_fn = get_attack("vlood").make_loss(teacher=teacher)
    assert isinstance(loss_fn, VLOODLoss) and not any(p.requires_grad for p in teacher.parameters())
    loss, outputs = loss_fn(tiny_flamingo, batch)
    assert loss_fn.last["kl"] == pytest.approx(0.0, abs=1e-6)  # identical teacher
    assert 0 < loss_fn.last["weight"] < 1 and loss_fn.last["ccp"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_flamingo.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(KeyError, match="is_poisoned"):
        loss_fn(tiny_flamingo, {k: v for k, v in batch.items() if k != "is_poisoned"})
    assert get_attack("badnet").make_loss() is None  # plain captioning loss


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_image_text_to_text_vision_tokens_have_gradients(family):
    helpers = pytest.importorskip("test_vlm_image_text_to_text", reason="needs the tiny model builders of the adapter tests")
    from srd_hf.vlm.image_text_to_text import ImageTextToTextCaptioner

    model, processor = helpers.FAMILIES[family]()
    captioner = ImageTextToTextCaptioner(model, processor)
    pixels = torch.rand(2, 3, 40, 40, requires_grad=True)  # resized to 32 px inside
    tokens = captioner.vision_tokens(pixels)
    assert tokens.shape[0] == 2 and tokens.ndim == 3
    tokens.sum().backward()
    assert pixels.grad.abs().sum() > 0
    assert captioner.get_input_embeddings() is model.get_input_embeddings()
