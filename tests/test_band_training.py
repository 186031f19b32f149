"""`BandTraining` on its own: optimizer group or own optimizer, clipping, the step, gradients cleared, state."""

import pytest
import torch

from trl_mgsr import MGSRConfig
from trl_mgsr.band_training import BandTraining


def band(tmp_path, **overrides):
    args = MGSRConfig(str(tmp_path), use_cpu=True, bf16=False, report_to="none", dac_features=4, dac_hidden_size=8,
                      dac_learning_rate=0.05, **overrides)
    return BandTraining(args, torch.device("cpu"))


def give_grads(b, value=1.0):
    for p in b.parameters():
        p.grad = torch.full_like(p, value)


def test_same_initial_weights_for_a_seed_and_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(())
    torch.manual_seed(123)
    a, b = band(tmp_path, seed=7), band(tmp_path, seed=7)
    assert torch.rand(()) == expected
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_attach_adds_one_group_once_or_makes_its_own_optimizer(tmp_path):
    b = band(tmp_path)
    student = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    b.attach(optimizer, own_optimizer=False)
    b.attach(optimizer, own_optimizer=False)  # create_optimizer may run again
    assert len(optimizer.param_groups) == 2 and b.optimizer is None
    assert optimizer.param_groups[1]["lr"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0.0
    own = band(tmp_path)
    own.attach(torch.optim.SGD(student.parameters(), lr=0.1), own_optimizer=True)
    assert isinstance(own.optimizer, torch.optim.AdamW) and own.optimizer.param_groups[0]["lr"] == 0.05


def test_clip_is_one_global_norm_in_the_main_optimizer_and_separate_with_its_own(tmp_path):
    student = torch.nn.Linear(4, 4)
    accelerator = type("OneProcess", (), {"clip_grad_norm_": staticmethod(torch.nn.utils.clip_grad_norm_)})()

    def grads(b):
        for p in student.parameters():
            p.grad = torch.full_like(p, 3.0)
        give_grads(b, 3.0)

    shared = band(tmp_path)
    grads(shared)
    everything = [*student.parameters(), *shared.parameters()]
    total = torch.cat([p.grad.flatten() for p in everything]).norm()
    norm = shared.clip_grad_norm(student, 1.0, accelerator, clip_student=pytest.fail, mixed_mesh=False)
    assert norm == pytest.approx(total.item(), rel=1e-5)
    assert torch.cat([p.grad.flatten() for p in everything]).norm() == pytest.approx(1.0, rel=1e-4)

    own = band(tmp_path)
    own.attach(torch.optim.SGD(student.parameters(), lr=0.1), own_optimizer=True)
    grads(own)
    norm = own.clip_grad_norm(student, 1.0, accelerator, clip_student=lambda model: "student norm", mixed_mesh=False)
    assert norm == "student norm"
    assert torch.cat([p.grad.flatten() for p in own.parameters()]).norm() == pytest.approx(1.0, rel=1e-4)
    assert all(torch.all(p.grad == 3.0) for p in student.parameters())  # left to `clip_student`


def test_finish_step_steps_its_own_optimizer_skips_overflow_and_clears_gradients(tmp_path):
    b = band(tmp_path)
    b.attach(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), own_optimizer=True)
    before = [p.detach().clone() for p in b.parameters()]
    give_grads(b, float("inf"))  # an fp16 overflow step: skipped, like the engine skips the student's
    b.finish_step()
    assert all(torch.equal(x, p) for x, p in zip(before, b.parameters()))
    assert all(p.grad is None for p in b.parameters())
    give_grads(b)
    b.finish_step()
    assert any(not torch.equal(x, p) for x, p in zip(before, b.parameters()))
    assert all(p.grad is None for p in b.parameters())


def test_average_gradients_is_a_no_op_on_one_process(tmp_path):
    b = band(tmp_path)
    give_grads(b, 2.0)
    b.average_gradients(num_processes=1)
    assert all(torch.all(p.grad == 2.0) for p in b.parameters())


def test_state_round_trip_with_its_own_optimizer(tmp_path):
    b = band(tmp_path)
    b.attach(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), own_optimizer=True)
    give_grads(b)
    b.finish_step()
    state = b.state_dict()
    assert set(state) == {"band_net", "band_optimizer"}
    other = band(tmp_path, seed=99)
    other.attach(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), own_optimizer=True)
    other.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(b.parameters(), other.parameters()))
    assert other.optimizer.state_dict()["state"].keys() == b.optimizer.state_dict()["state"].keys()
    assert set(band(tmp_path).state_dict()) == {"band_net"}  # in the main optimizer: its state is saved there
