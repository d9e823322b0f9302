"""The ablation configs (experiments/ablations/, docs/ablations.md): each one builds objects that
differ from its base's in exactly the intended settings, with the intended values, and the
committed files are exactly what `make_ablations.py` generates.

tests/test_configs.py already builds every gin file; here each ablation is built next to its base
(`flowrl.cli.parse_gin` + `flowrl.train.train(None, dry_run=True)`) and the two built
configurations are compared field by field, down into nested extractors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from functools import cache

import gin
import numpy as np
import pytest

import extractors
from flowrl.cli import EXPERIMENTS_DIR, parse_gin
from flowrl.train import train

ABLATIONS_DIR = EXPERIMENTS_DIR / "ablations"


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_ablations", ABLATIONS_DIR / "make_ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_ablations = _load_generator()
DOMAINS = make_ablations.DOMAINS


@cache
def build(config: str) -> dict:
    """The dry-run build of one config (cached: building is pure; gin state is cleared after)."""
    gin.clear_config()
    try:
        parse_gin([config], [])
        return train(None, dry_run=True)
    finally:
        gin.clear_config()


def differences(a, b, path: str = "") -> dict[str, tuple]:
    """{dotted path: (a value, b value)} of every leaf where two built configs differ.

    Dicts and dataclasses (Equinox modules) are walked field by field; a change of class is
    reported at that path and not walked further; arrays are compared by value.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        found = {}
        for key in sorted(set(a) | set(b)):
            found.update(differences(a.get(key), b.get(key), f"{path}.{key}" if path else key))
        return found
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        if type(a) is not type(b):
            return {path: (type(a).__name__, type(b).__name__)}
        found = {}
        for field in dataclasses.fields(a):
            found.update(differences(getattr(a, field.name), getattr(b, field.name), f"{path}.{field.name}"))
        return found
    if hasattr(a, "shape") or hasattr(b, "shape"):
        equal = np.shape(a) == np.shape(b) and bool(np.all(np.asarray(a) == np.asarray(b)))
        return {} if equal else {path: (np.asarray(a).tolist(), np.asarray(b).tolist())}
    return {} if a == b else {path: (a, b)}


def qam_path(built: dict) -> str:
    """Dotted path of the (only) QAM inside the built extractor: 'extractor' or e.g. 'extractor.inner'."""
    found = []

    def walk(node, path):
        if isinstance(node, extractors.QAM):
            found.append(path)
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            for field in dataclasses.fields(node):
                walk(getattr(node, field.name), f"{path}.{field.name}")

    walk(built["extractor"], "extractor")
    assert len(found) == 1, found
    return found[0]


def eval_path(built: dict, path: str):
    """The object at a dotted path of `qam_path`'s form in a built config."""
    head, *rest = path.split(".")
    node = built[head]
    for name in rest:
        node = getattr(node, name)
    return node


def ablation(study: str, variant: str, domain: str) -> str:
    return f"ablations/{study}/{variant}/{domain}.gin"


# ---- the generated files ------------------------------------------------------------------------


def test_committed_files_are_exactly_the_generated_ones(tmp_path):
    generated = make_ablations.render_all()
    on_disk = {str(p.relative_to(ABLATIONS_DIR)) for p in ABLATIONS_DIR.rglob("*.gin")}
    assert on_disk == set(generated), "run experiments/ablations/make_ablations.py"
    for rel, text in generated.items():
        assert (ABLATIONS_DIR / rel).read_text(encoding="utf-8") == text, rel
    # Regenerating into a fresh directory gives the same bytes, and --check agrees.
    assert make_ablations.main(["--dir", str(tmp_path)]) == 0
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (ABLATIONS_DIR / rel).read_bytes(), rel
    assert make_ablations.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "sensitivity/noclip/scene-play.gin").write_text("# edited\n")
    assert make_ablations.main(["--check", "--dir", str(tmp_path)]) == 1


def test_each_ablation_changes_one_to_three_bindings_over_one_include():
    for rel, text in make_ablations.render_all().items():
        statements = [line for line in text.splitlines() if line and not line.startswith("#")]
        includes = [line for line in statements if line.startswith("include ")]
        assert len(includes) == 1, rel
        assert 1 <= len(statements) - 1 <= 3, rel


def test_inv_temp_values_are_written_without_float_noise():
    assert make_ablations._number(3.0 * 0.3) == "0.9"
    assert make_ablations._number(0.1 * 0.1) == "0.01"
    assert make_ablations._number(10.0 * 30.0) == "300.0"


# ---- sensitivity study (QAM-E, representative tasks) ---------------------------------------------


@pytest.mark.parametrize("domain", DOMAINS)
def test_sensitivity_base_is_qam_edit_on_the_representative_task(domain):
    base = build(f"ablations/sensitivity/base/{domain}.gin")
    task = "task1" if "maze" in domain else "task2"
    assert base["env_name"] == f"{domain}-singletask-{task}-v0"
    diff = differences(build(f"qam-edit/{domain}.gin"), base)
    assert set(diff) <= {"env_name"}, diff  # only the task, and only where the domain default differs
    assert base["agent"].grad_clip_norm == 1.0 and base["agent"].num_critics == 10
    qam = qam_path(base)
    assert float(eval_path(base, qam).inv_temp) == pytest.approx(make_ablations.QAM_E_INV_TEMP[domain])
    assert eval_path(base, qam).flow_steps == 10


def _sensitivity_cases():
    cases = [("noclip", lambda qam: {"agent.grad_clip_norm": (1.0, None)}),
             ("ensemble-2", lambda qam: {"agent.num_critics": (10, 2)})]
    for steps in make_ablations.SENSITIVITY_FLOW_STEPS:
        cases.append((f"flow-steps-{steps}", lambda qam, steps=steps: {f"{qam}.flow_steps": (10, steps)}))
    return cases


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("variant, expected", _sensitivity_cases(), ids=[c[0] for c in _sensitivity_cases()])
def test_sensitivity_variant_differs_in_exactly_its_binding(variant, expected, domain):
    base = build(f"ablations/sensitivity/base/{domain}.gin")
    varied = build(ablation("sensitivity", variant, domain))
    assert differences(base, varied) == expected(qam_path(base))


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("factor", make_ablations.INV_TEMP_FACTORS)
def test_temperature_variant_scales_only_lambda(factor, domain):
    base = build(f"ablations/sensitivity/base/{domain}.gin")
    varied = build(ablation("sensitivity", f"inv-temp-x{factor:g}", domain))
    path = f"{qam_path(base)}.inv_temp"
    diff = differences(base, varied)
    assert set(diff) == {path}
    before, after = diff[path]
    assert after == pytest.approx(before * factor, rel=1e-6)


# ---- lean vs basic adjoint (plain QAM base, all domains) -----------------------------------------


@pytest.mark.parametrize("domain", DOMAINS)
def test_bam_with_paper_lambda_is_the_shipped_bam_config(domain):
    base = build(f"qam/{domain}.gin")
    varied = build(ablation("adjoint", "bam-paper-lambda", domain))
    assert differences(base, varied) == {"extractor": ("QAM", "BAM")}
    assert differences(build(f"bam/{domain}.gin"), varied) == {}
    assert float(varied["extractor"].inv_temp) == make_ablations.BAM_INV_TEMP[domain]


@pytest.mark.parametrize("domain", DOMAINS)
def test_bam_with_matched_lambda_uses_k_times_qam_lambda(domain):
    base = build(f"qam/{domain}.gin")
    varied = build(ablation("adjoint", "bam-matched-lambda", domain))
    assert differences(base, varied) == {"extractor": ("QAM", "BAM")}
    bam = varied["extractor"]
    assert isinstance(bam, extractors.BAM)
    assert float(bam.inv_temp) == pytest.approx(base["extractor"].flow_steps * float(base["extractor"].inv_temp))
    assert float(bam.rho) == float(base["agent"].rho)
    assert bam.flow_steps == base["extractor"].flow_steps


@pytest.mark.parametrize("domain", DOMAINS)
def test_consistent_scheme_changes_only_the_discretisation(domain):
    base = build(f"qam/{domain}.gin")
    varied = build(ablation("adjoint", "consistent-scheme", domain))
    assert differences(base, varied) == {"extractor.scheme": ("reference", "consistent")}


def test_differences_sees_nested_changes():
    """The comparison the tests above rely on reports a nested field, a class change, an array."""
    a = {"x": extractors.QAM(), "y": 1}
    assert differences(a, {"x": extractors.QAM(), "y": 1}) == {}
    assert differences(a, {"x": extractors.QAM(flow_steps=3), "y": 1}) == {"x.flow_steps": (10, 3)}
    assert set(differences(a, {"x": extractors.QAM(inv_temp=2.0), "y": 1})) == {"x.inv_temp"}
    assert differences(a, {"x": extractors.BAM(), "y": 2}) == {"x": ("QAM", "BAM"), "y": (1, 2)}
