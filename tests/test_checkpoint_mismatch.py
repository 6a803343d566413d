"""trainpatterns.checkpoint: a checkpoint that does not fit the model is one error whose first line
names the missing and unexpected keys and the mismatched shapes (what one-line reports keep).

References: the two models' own ``state_dict()`` keys and shapes, compared here with plain set and
shape arithmetic; torch's own ``load_state_dict`` for what loads and what does not; the weights
saved, compared element by element, for what loads.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainpatterns.checkpoint import CheckpointError, CheckpointManager, CheckpointMismatchError, load_weights
from trainpatterns.checkpoint._fit import load_module


class CNN(torch.nn.Module):
    def __init__(self, classes: int = 10, extra: bool = False, head_bias: bool = True) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(64, classes, bias=head_bias)
        if extra:
            self.extra = torch.nn.Linear(classes, 2)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def listed(keys: list, limit: int) -> str:
    shown = keys[:limit] + ([f"... and {len(keys) - limit} more"] if len(keys) > limit else [])
    return ", ".join(shown)


def expected_line(source: str, cls: str, saved: dict, live: dict, strict: bool = True) -> str:
    """The first line, from the two state dicts (keys in the model's order, then the checkpoint's)."""
    parts = []
    missing = [repr(k) for k in live if k not in saved]
    unexpected = [repr(k) for k in saved if k not in live]
    if strict and missing:
        parts.append(f"missing keys [{listed(missing, 8)}]")
    if strict and unexpected:
        parts.append(f"unexpected keys [{listed(unexpected, 8)}]")
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(live[k].shape)}"
              for k, v in saved.items() if k in live and v.shape != live[k].shape
              and not (live[k].dim() == 0 and v.shape == (1,))]  # torch takes a (1,) value for a 0-d one
    if shapes:
        parts.append(f"shape mismatch {listed(shapes, 4)}")
    return f"{source} does not fit {cls}: " + "; ".join(parts)


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0]


@pytest.fixture
def saved_cnn(tmp_path):
    model = CNN()
    mgr = CheckpointManager(tmp_path, async_save=False)
    mgr.save({"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1)}, 1)
    mgr.save({"model": model, "opt": torch.optim.SGD(model.parameters(), lr=0.1)}, 2)
    return mgr, {k: v.clone() for k, v in model.state_dict().items()}


def test_restore_into_another_model_names_keys_and_shapes_in_the_first_line(saved_cnn, tmp_path):
    mgr, saved = saved_cnn
    other = CNN(classes=5, extra=True, head_bias=False)
    state = {"model": other, "opt": torch.optim.SGD(other.parameters(), lr=0.1)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "latest" must not fall back to an older checkpoint: it would not fit either
        with pytest.raises(CheckpointMismatchError) as info:
            mgr.restore(state)
    e = info.value
    assert isinstance(e, ValueError) and isinstance(e, RuntimeError) and not isinstance(e, CheckpointError)
    source = f"checkpoint {tmp_path / 'step_00000002'} entry 'model'"
    assert first_line(e) == expected_line(source, "CNN", saved, other.state_dict())
    assert first_line(e) == (f"{source} does not fit CNN: missing keys ['extra.weight', 'extra.bias']; "
                             "unexpected keys ['fc.bias']; shape mismatch fc.weight: checkpoint (10, 64) vs "
                             "model (5, 64)")
    assert "Error(s) in loading state_dict" in str(e.__cause__)  # torch's own error stays chained


def test_load_weights_names_keys_and_shapes_from_a_directory_or_a_file(saved_cnn, tmp_path):
    mgr, saved = saved_cnn
    other = CNN(classes=5, extra=True)
    live = other.state_dict()
    step2 = tmp_path / "step_00000002"
    for call, source in [(lambda **kw: mgr.load_weights(other, key="model", **kw), f"checkpoint {step2} entry 'model'"),
                         (lambda **kw: mgr.load_weights(other, 1, key="model", **kw),
                          f"checkpoint {tmp_path / 'step_00000001'} entry 'model'"),
                         (lambda **kw: load_weights(other, step2 / "model.safetensors", **kw),
                          f"weights file {step2 / 'model.safetensors'}")]:
        with pytest.raises(CheckpointMismatchError) as info:
            call()
        assert first_line(info.value) == expected_line(source, "CNN", saved, live)
        with pytest.raises(CheckpointMismatchError) as info:  # strict=False: only the shapes are errors
            call(strict=False)
        assert first_line(info.value) == expected_line(source, "CNN", saved, live, strict=False)
        assert first_line(info.value).endswith("shape mismatch fc.weight: checkpoint (10, 64) vs model (5, 64), "
                                               "fc.bias: checkpoint (10,) vs model (5,)")


def test_a_fitting_checkpoint_still_loads_exactly(saved_cnn):
    mgr, saved = saved_cnn
    fresh = CNN()
    mgr.load_weights(fresh, key="model")
    for k, v in saved.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    bigger = CNN(extra=True)  # strict=False after adding a layer: loads what fits, reports the rest
    result = mgr.load_weights(bigger, key="model", strict=False)
    assert result.missing_keys == ["extra.weight", "extra.bias"] and result.unexpected_keys == []


def test_long_key_lists_are_cut_with_a_count(tmp_path):
    saved_model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(30)])
    live_model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(24)], torch.nn.Identity(),
                                     *[torch.nn.Linear(2, 2) for _ in range(30)])
    mgr = CheckpointManager(tmp_path, async_save=False)
    mgr.save({"model": saved_model}, 0)
    with pytest.raises(CheckpointMismatchError) as info:
        mgr.load_weights(live_model)
    saved, live = saved_model.state_dict(), live_model.state_dict()
    line = first_line(info.value)
    assert line == expected_line(f"checkpoint {tmp_path / 'step_00000000'} entry 'model'", "Sequential", saved, live)
    assert "... and 42 more]" in line and line.endswith("... and 44 more") and len(line) < 1000
    assert str(info.value) == line  # one line


def buffers(shapes: dict) -> torch.nn.Module:
    module = torch.nn.Module()
    for name, shape in shapes.items():
        module.register_buffer(name, torch.zeros(shape))
    return module


_shapes = st.dictionaries(st.sampled_from([f"b{i}" for i in range(14)]),
                          st.lists(st.integers(0, 3), max_size=2).map(tuple), max_size=14)


@settings(max_examples=80, deadline=None)
@given(saved_shapes=_shapes, live_shapes=_shapes, strict=st.booleans())
def test_any_key_and_shape_difference_is_named_or_the_state_loads(saved_shapes, live_shapes, strict):
    saved = {name: torch.full(shape, 7.0) for name, shape in saved_shapes.items()}
    twin, module = buffers(live_shapes), buffers(live_shapes)
    try:
        twin.load_state_dict(saved, strict=strict)  # torch's verdict is the reference for what loads
    except RuntimeError:
        with pytest.raises(CheckpointMismatchError) as info:
            load_module(module, saved, strict, "src")
        assert str(info.value) == expected_line("src", "Module", saved, module.state_dict(), strict)
    else:
        load_module(module, saved, strict, "src")
        for k, v in twin.state_dict().items():
            assert torch.equal(module.state_dict()[k], v), k


def test_other_errors_of_load_state_dict_pass_through_unchanged(tmp_path):
    class Picky(torch.nn.Linear):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            raise RuntimeError("CUDA out of memory (pretend)")

    mgr = CheckpointManager(tmp_path, async_save=False)
    mgr.save({"model": torch.nn.Linear(2, 2)}, 0)
    with pytest.raises(RuntimeError, match=r"^CUDA out of memory \(pretend\)$") as info:
        mgr.load_weights(Picky(2, 2))
    assert not isinstance(info.value, CheckpointMismatchError)
    assert os.path.isdir(tmp_path / "step_00000000")
