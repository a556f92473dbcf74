"""Online methods (DML, ONE, OKDDip, EKD): losses, gradients, extraction, tiny runs, resume, ensemble file.

Networks are tinynets on synthetic 8x8 data (4 classes); torch runs on one thread here:
the tiny convolutions are faster that way on a shared 2-core machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline import runs
from pipeline.config.base import ConfigError
from pipeline.config.training import ScheduleConfig, TrainConfig
from pipeline.data import build_data
from pipeline.distill import MethodContext, MethodSetupError, build_method
from pipeline.distill.losses import (
    attention_kd_loss,
    gated_ensemble,
    kd_loss,
    log_mean_probs,
    mutual_kl_loss,
    peer_attention,
)
from pipeline.distill.online.common import (
    MultiBranchNet,
    OnlineDistiller,
    load_ensemble,
    ramp_length,
    sigmoid_rampup,
)
from pipeline.distill.registry import load_methods
from pipeline.engine.checkpoint import load_model_file, load_torch, state_digest
from pipeline.engine.loop import RunSpec, fit
from pipeline.models import build
from pipeline.params import ONLINE_METHODS, parse_params
from pipeline.runs import RunId
from tests.conftest import fit_until_crash, tiny_params

CTX = MethodContext(student_arch="tinynet_s", num_classes=4, in_channels=3, image_size=8, num_train=168,
                    epochs=3, teacher_arch="tinynet_m")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Tiny convolutions run faster on one thread on a shared 2-core machine."""


def make(method: str, seed: int = 0, ctx: MethodContext = CTX, **cfg) -> OnlineDistiller:
    """An online task on a tinynet student with the default params of ``method`` (overridden by ``cfg``)."""
    torch.manual_seed(seed)
    params = getattr(parse_params({"online": {method: cfg}}).online, method)
    task = build_method(method, build(ctx.student_arch, ctx.num_classes, ctx.in_channels, ctx.image_size), None, params, ctx)
    assert isinstance(task, OnlineDistiller)
    return task


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g), torch.arange(n)


def grads(loss: torch.Tensor, module: torch.nn.Module) -> list[torch.Tensor]:
    """Gradient of ``loss`` for every parameter of ``module`` (zeros where it does not depend on it)."""
    params = list(module.parameters())
    out = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out, strict=True)]


def flows(loss: torch.Tensor, module: torch.nn.Module) -> bool:
    return any(g.abs().sum() > 0 for g in grads(loss, module))


# -- registry, params, ramp ------------------------------------------------------------------------


def test_every_online_method_is_registered_online_and_configurable():
    specs = load_methods()
    defaults = parse_params({}).online
    for name in ONLINE_METHODS:
        assert not specs[name].offline and specs[name].cls.__doc__
        assert isinstance(getattr(defaults, name), specs[name].params)
    assert defaults.one.num_branches == 3 and defaults.one.temperature == 3.0 and defaults.dml.num_peers == 2
    assert "RECONSTRUCTION" in specs["ekd"].cls.__doc__


def test_bad_online_params_name_the_key():
    with pytest.raises(ConfigError, match=r"online\.methods.*allowed: dml, ekd, okddip, one"):
        parse_params({"online": {"methods": ["kd"]}})
    with pytest.raises(ConfigError, match=r"online\.dml.*peer_models"):
        parse_params({"online": {"dml": {"num_peers": 2, "peer_models": ["tinynet_s", "tinynet_m"]}}})
    with pytest.raises(ConfigError, match="unknown model"):
        parse_params({"online": {"ekd": {"teacher_model": "nope"}}})
    with pytest.raises(MethodSetupError, match=r"one: shared_stages=3 .* tinynet_s, which has 3 stages"):
        make("one", shared_stages=3)


def test_sigmoid_rampup_follows_the_reference():
    assert sigmoid_rampup(0, 80) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(40, 80) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(80, 80) == sigmoid_rampup(200, 80) == sigmoid_rampup(3, 0) == 1.0
    assert ramp_length(None, 300) == 80 and ramp_length(None, 20) == 5 and ramp_length(7, 20) == 7
    task = make("one")
    task.on_epoch_start(0, 20)
    assert task.ramp() == pytest.approx(math.exp(-5.0))
    task.on_epoch_start(5, 20)
    assert task.ramp() == 1.0


# -- losses against their formulas ------------------------------------------------------------------


def test_gate_weights_sum_to_one_and_mix_the_branch_logits():
    task = make("one", num_branches=4)
    x, _, _ = batch()
    task.train()
    shared, outs = task.student(x)
    g = task.gate(shared)
    assert g.shape == (8, 4) and (g >= 0).all()
    torch.testing.assert_close(g.sum(dim=1), torch.ones(8))
    logits = torch.stack([z for _, z in outs], dim=1)
    manual = sum(g[:, i : i + 1] * logits[:, i] for i in range(4))
    torch.testing.assert_close(gated_ensemble(logits, g), manual)


def test_peer_attention_rows_sum_to_one_and_skip_self_unless_asked():
    q, k = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    a = peer_attention(q, k)
    torch.testing.assert_close(a.sum(dim=-1), torch.ones(5, 3))
    assert a.diagonal(dim1=1, dim2=2).abs().max() == 0
    a_self = peer_attention(q, k, include_self=True)
    torch.testing.assert_close(a_self, torch.softmax(q @ k.transpose(1, 2), dim=-1))


def test_attention_kd_loss_matches_the_formula():
    z = torch.randn(6, 3, 5)
    alpha = peer_attention(torch.randn(6, 3, 2), torch.randn(6, 3, 2))
    t = 3.0
    expected = 0.0
    for a in range(3):
        target = sum(alpha[:, a, b : b + 1] * z[:, b] for b in range(3))
        expected = expected + kd_loss(z[:, a], target, t)
    torch.testing.assert_close(attention_kd_loss(z, z, alpha, t), expected)


def test_mutual_kl_and_ensemble_helpers_match_their_formulas():
    z = [torch.randn(4, 5) for _ in range(3)]
    expected = sum(kd_loss(z[i], z[j], 2.0) for i in range(3) for j in range(3) if i != j) / 2
    torch.testing.assert_close(mutual_kl_loss(z, 2.0), expected)
    mean_p = torch.stack([F.softmax(v, dim=1) for v in z]).mean(0)
    torch.testing.assert_close(log_mean_probs(z).softmax(dim=1), mean_p)


def test_detached_targets_carry_no_gradient():
    # losses: the teacher side of every online KL gets no gradient
    z_s, z_t = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    mutual_kl_loss([z_s, z_t]).backward()
    only_own = torch.autograd.grad(kd_loss(z_t, z_s.detach(), 1.0), z_t)[0]
    torch.testing.assert_close(z_t.grad, only_own)  # peer 1 learns from its own term only
    peers = torch.randn(2, 3, 5, requires_grad=True)
    q = torch.randn(2, 3, 4, requires_grad=True)
    loss = attention_kd_loss(torch.randn(2, 3, 5), peers, peer_attention(q, torch.randn(2, 3, 4)))
    g_peers, g_q = torch.autograd.grad(loss, [peers, q], allow_unused=True)
    assert g_peers is None and g_q.abs().sum() > 0  # the targets' logits: none; the attention: learns

    x, y, i = batch()
    one = make("one").train()
    one.on_epoch_start(10, 10)
    _, terms = one(x, y, i)
    assert not flows(terms["kl"], one.gate)  # the ensemble teacher is detached in the KL
    assert flows(terms["ce_ensemble"], one.gate)

    dml = make("dml").train()
    z0, z1 = dml.student(x), dml.others[0](x)
    assert not flows(kd_loss(z0, z1, 1.0), dml.others[0])

    ok = make("okddip").train()
    ok.on_epoch_start(10, 10)
    _, terms = ok(x, y, i)
    leader = ok.student.branches[-1]
    assert not any(flows(terms["kl_leader"], b) for b in ok.student.branches[:-1])
    assert not flows(terms["kl_peers"], leader) and flows(terms["kl_peers"], ok.query)

    ekd = make("ekd").train()
    ekd.on_epoch_start(10, 10)
    _, terms = ekd(x, y, i)
    assert not flows(terms["kd"] + terms["feat"], ekd.evolving_teacher)  # the teacher learns from labels only
    assert flows(terms["ce_teacher"], ekd.evolving_teacher) and flows(terms["feat"], ekd.guides)


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_gradients_flow_into_every_network(method: str):
    task = make(method).train()
    task.on_epoch_start(10, 10)
    logits, terms = task(*batch())
    assert logits.shape == (8, 4) and all(torch.isfinite(v) for v in terms.values())
    loss = torch.stack(list(terms.values())).sum()
    parts = {"dml": lambda t: [t.student, *t.others],
             "one": lambda t: [t.student.trunk, *t.student.branches, t.gate],
             "okddip": lambda t: [t.student.trunk, *t.student.branches, t.query, t.key],
             "ekd": lambda t: [t.student, t.evolving_teacher, *t.guides]}[method](task)
    for part in parts:
        assert flows(loss, part), f"{method}: no gradient reaches {type(part).__name__}"


# -- the deployed network ---------------------------------------------------------------------------


@pytest.mark.parametrize("method,split", [("one", None), ("one", 0), ("okddip", None), ("okddip", 1)])
def test_deployed_network_equals_its_part_of_the_multi_branch_network(method: str, split: int | None):
    task = make(method, shared_stages=split)
    x, y, i = batch()
    task.train()
    task(x, y, i)  # move the BN statistics away from their initial values
    net: MultiBranchNet = task.student
    index = 2 if method == "one" else task.cfg.num_peers
    task.deployed_name = "branch2" if method == "one" else "leader"
    deployed = task.deployable()
    assert type(deployed) is type(build("tinynet_s", 4, 3, 8))
    s = net.split
    state = deployed.state_dict()
    for k, v in net.trunk.state_dict().items():
        assert torch.equal(state[k], v), k
    for k, v in net.branches[index].state_dict().items():
        if k.startswith("stages."):
            j, rest = k.split(".", 2)[1:]
            k = f"stages.{s + int(j)}.{rest}"
        assert torch.equal(state[k], v), k
    assert len(state) == len(net.trunk.state_dict()) + len(net.branches[index].state_dict())
    deployed.eval(), task.eval()
    torch.testing.assert_close(deployed(x), task.heads(x)[task.deployed])


def test_finalize_picks_the_best_candidate_and_reports_costs():
    task = make("one")
    history = [{"val_branch0/top1": 90.0, "val_branch1/top1": 50.0, "val_branch2/top1": 10.0},
               {"val_branch0/top1": 60.0, "val_branch1/top1": 80.0, "val_branch2/top1": 80.0, "val_ensemble/top1": 85.0}]
    facts = task.finalize(history)
    assert facts["deployed"] == task.deployed == "branch1"  # last epoch; ties go to the first
    assert facts["ensemble_val_top1"] == 85.0
    assert facts["trained_params"] > facts["deployed_params"] == sum(p.numel() for p in build("tinynet_s", 4, 3, 8).parameters())
    assert facts["trained_macs"] > facts["deployed_macs"] > 0

    dml = make("dml", num_peers=3, peer_models=["tinynet_m"])
    assert dml.peer_archs == ["tinynet_s", "tinynet_m", "tinynet_s"] and dml.candidates() == ["peer0", "peer2"]
    facts = dml.finalize([{"val_peer0/top1": 50.0, "val_peer1/top1": 99.0, "val_peer2/top1": 70.0}])
    assert facts["deployed"] == "peer2" and dml.deployable() is dml.others[1]  # never the other architecture


# -- through the pipeline: tiny runs, the ensemble file, resume -------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    """Every online method trained and evaluated for six epochs, in a folder with no teacher."""
    root = tmp_path_factory.mktemp("online")
    params = parse_params(tiny_params(train={"epochs": 6}, online={"methods": list(ONLINE_METHODS)}))
    for method in ONLINE_METHODS:
        runs.train(params, RunId("online", "tinynet_s", method), root)
        runs.evaluate(params, RunId("online", "tinynet_s", method), root)
    assert not (root / "runs" / "teacher").exists()
    return root, params


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_tiny_run_ends_above_chance_and_records_the_ensemble(method: str, trained):
    root, params = trained
    m = json.loads((root / "metrics" / method / "tinynet_s.json").read_text())
    assert m["top1"] > 60 and m["ensemble_top1"] > 60  # chance is 25
    assert "teacher_agreement" not in m and 0 <= m["ensemble_agreement"] <= 100
    assert m["trained_params"] > m["params"] and m["trained_macs"] > m["macs"]
    facts = json.loads((root / "runs" / method / "tinynet_s" / "train.json").read_text())["method_facts"]
    assert facts["deployed_params"] == m["params"] and facts["deployed_macs"] == m["macs"]
    assert facts["ensemble_val_top1"] is not None and facts["deployed"] in facts["val_top1"]
    assert set(m["network_top1"]) == set(facts["val_top1"]) - {"ensemble"}


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_model_file_is_the_deployed_part_of_the_ensemble_file(method: str, trained):
    root, params = trained
    run_dir = root / "runs" / method / "tinynet_s"
    model, info = load_model_file(run_dir / "model.pt", expect_arch="tinynet_s")
    assert info["role"] == "online"
    task = load_ensemble(run_dir / "ensemble.pt")  # weights_only load, rebuilt from the file alone
    assert type(task).__name__.lower() == method
    data = build_data(params.data, params.seed)
    x = torch.stack([data.test[i][0] for i in range(16)])
    torch.testing.assert_close(model(x), task.heads(x)[task.deployed])
    deployed = task.deployable().state_dict()
    assert deployed.keys() == model.state_dict().keys()
    assert all(torch.equal(deployed[k], v) for k, v in model.state_dict().items())
    assert (root / ".kdpipe" / "state" / method / "tinynet_s" / "finished.json").is_file()  # kept until DVC records


@pytest.mark.parametrize("method", ONLINE_METHODS)
def test_resume_state_holds_every_network(method: str):
    task = make(method)
    keys = set(task.trainable_state_dict())
    assert keys == set(task.state_dict())
    prefixes = {"dml": ("student.", "others.0."), "one": ("student.trunk.", "student.branches.2.", "gate."),
                "okddip": ("student.branches.3.", "query.", "key."),
                "ekd": ("student.", "evolving_teacher.", "guides.")}[method]
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix


@pytest.mark.parametrize("method", ["one", "ekd"])
def test_killed_online_run_resumes_to_the_weights_of_an_uninterrupted_run(method: str, tmp_path: Path):
    params = parse_params(tiny_params())
    data = build_data(params.data, params.seed)
    cfg = TrainConfig(epochs=3, batch_size=32, schedule=ScheduleConfig(name="cosine"))
    full = make(method)
    fit(full, data.train, data.val, cfg, 0, RunSpec("full", tmp_path / "full", "fp"))

    fit_until_crash(0, make(method), data.train, data.val, cfg, 0, RunSpec("cut", tmp_path / "cut", "fp"))
    assert set(load_torch(tmp_path / "cut" / "last.pt")["model"]) == set(full.trainable_state_dict())

    resumed = make(method, seed=123)  # different init: every network must come from the checkpoint
    result = fit(resumed, data.train, data.val, cfg, 0, RunSpec("cut", tmp_path / "cut", "fp"))
    assert result.resumed_from == 1
    assert state_digest(resumed.trainable_state_dict()) == state_digest(full.trainable_state_dict())
    assert full.finalize(result.history)["deployed"] == resumed.finalize(result.history)["deployed"]
