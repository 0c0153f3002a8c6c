"""The contract every registered purifier and attack keeps, checked over the registries (scikit-learn's
``check_estimator`` shape): a new module is tested by being added, with no list here to edit.

For each: uint8 NHWC in, uint8 NHWC of the same shape out; an attack's bound holds on the stored images;
the same seed gives the same bytes; bad input (float images, wrong rank, labels of the wrong length or of one
class) and out-of-range parameters (every declared :class:`~unpoison.params.Param` bound) are refused with a
:class:`~unpoison.errors.UserError`; ``get_params`` reports what was set.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unpoison.attacks import ATTACKS, make_attack
from unpoison.attacks.base import bound_stats
from unpoison.data import make_synthetic
from unpoison.defenses import DEFENSES, make_purifier
from unpoison.errors import UserError
from unpoison.params import Param

SHAPE = (8, 8, 3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    ds = make_synthetic(n=32, size=SHAPE[0], channels=SHAPE[2], classes=4, seed=0)
    return ds.x_train, ds.y_train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("contract")


def _below(p: Param) -> object | None:
    """A value just outside ``p``'s declared range (None when it declares none)."""
    if p.choices:
        return "no-such-choice"
    if p.low is not None:
        return p.low if p.low_open else (p.low - 1 if p.type is int else p.low - 0.5)
    if p.high is not None:
        return p.high + 1
    return None


def _out_of_range(table: dict[str, Param]) -> list[tuple[str, object]]:
    return [(k, v) for k, p in sorted(table.items()) if p.type in (int, float, str) and (v := _below(p)) is not None]


# --- purifiers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DEFENSES.names())
def test_purifier_contract(name: str, data, workdir) -> None:
    x, y = data
    cls = DEFENSES.get(name)
    kw = cls.smoke(workdir, SHAPE)

    def build(**over: object):
        return make_purifier(name, device="cpu", seed=3, progress=False, **{**kw, **over})

    out = build().fit_purify(x, y)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert np.array_equal(build().fit_purify(x, y), out), "same seed, different bytes"
    assert np.array_equal(build().fit_purify(torch.from_numpy(x), torch.from_numpy(y)), out)  # tensors accepted
    got = build().get_params()
    assert all(got.get(k) == v for k, v in kw.items() if k in cls.PARAMS)
    for bad in (x.astype(np.float32), x[0], x.reshape(len(x), -1)):
        with pytest.raises(UserError):
            build().fit_purify(bad, y)
    if cls.tags.labels:
        with pytest.raises(UserError):
            build().fit_purify(x, y[:-1])
        with pytest.raises(UserError):
            build().fit_purify(x)
    with pytest.raises(UserError, match="no parameter"):
        build(no_such_parameter=1)
    for k, v in _out_of_range(cls.PARAMS):
        with pytest.raises(UserError):
            build(**{k: v})


@pytest.mark.parametrize("name", DEFENSES.names())
def test_purifier_tags_match_what_the_class_does(name: str, data, workdir) -> None:
    """A class's tags are its one declaration of what it can do, so they must be true of it: the methods and
    keyword arguments they promise exist, a learning purifier changes state in fit, the packages exist."""
    import importlib.util
    import inspect

    from unpoison.tags import Tags

    cls = DEFENSES.get(name)
    tags = cls.tags
    assert isinstance(tags, Tags) and tags.p_hat in ("none", "extras", "infer")
    init = inspect.signature(cls.__init__).parameters
    assert tags.checkpoint == ("checkpoint_dir" in init and "resume" in init)
    assert tags.streaming == ("memory_budget" in init and callable(getattr(cls, "plan", None)))
    if tags.p_hat == "infer":
        assert callable(getattr(cls, "fit_stage1", None)) and callable(getattr(cls, "estimate_perturbation", None))
    for module, _ in tags.requires:
        assert importlib.util.find_spec(module) is not None or pytest.skip(f"{module} not installed")
    if tags.p_hat != "none":
        x, y = data
        pur = make_purifier(name, device="cpu", seed=3, progress=False, **cls.smoke(workdir, SHAPE))
        pur.fit_purify(x, y)
        assert pur.extras_["p_hat"].shape == x.shape  # every p_hat purifier leaves it after fit_purify


# --- attacks -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ATTACKS.names())
def test_attack_contract(name: str, data) -> None:
    x, y = data
    cls = ATTACKS.get(name)

    def build(**over: object):
        return make_attack(name, seed=5, device="cpu", progress=False, **{**cls.SMOKE, **over})

    res = build().poison(x, y, ratio=0.5)
    assert res.x.dtype == np.uint8 and res.x.shape == x.shape and res.delta.dtype == np.int16
    assert len(res.indices) == 16
    untouched = np.setdiff1d(np.arange(len(x)), res.indices)
    assert np.array_equal(res.x[untouched], x[untouched])
    np.testing.assert_array_equal(res.x.astype(np.int16) - x.astype(np.int16), res.delta)
    eps, norm = res.info["eps"], res.info["norm"]
    st = bound_stats(res.delta)[norm]
    d = int(np.prod(SHAPE))
    limit = {"linf": eps + 0.5 / 255, "l2": eps + math.sqrt(d) * 0.5 / 255, "l0": eps}[norm]
    assert st.max() <= limit + 1e-9
    again = build().poison(x, y, ratio=0.5)
    assert np.array_equal(again.x, res.x) and np.array_equal(again.indices, res.indices), "same seed, other bytes"
    for bad_x, bad_y in ((x.astype(np.float32), y), (x[0], y), (x, y[:-1]), (x, np.zeros_like(y))):
        with pytest.raises(UserError):
            build().poison(bad_x, bad_y)
    with pytest.raises(UserError, match="no parameter"):
        build(no_such_parameter=1)
    for k, v in _out_of_range(cls.PARAMS):
        with pytest.raises(UserError):
            build(**{k: v})
