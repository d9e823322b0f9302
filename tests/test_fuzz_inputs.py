"""Bad input, fuzzed: dataset files and gin configs get one clear error, nothing is executed.

Dataset loader (`flowrl.ogbench.datasets.read_dataset_file` / `load_dataset`), property-based
(hypothesis, derandomised so CI is reproducible):

- per-key faults: missing and extra keys, random shapes (0-d, 0 rows, wrong width, extra axes,
  row counts that disagree), every dtype family (float16/32/64, ints, bool, complex, strings,
  bytes, datetimes, structured records, objects), NaN/±inf anywhere, terminals that are not 0/1
  or do not end an episode, and object arrays holding a payload whose unpickling would run code;
- whole-file faults: random bytes, truncation anywhere, a flipped byte in the data, a bare
  pickle stream, a single `.npy`, a zip with foreign members, malformed `.npy` headers.

Each input either loads into arrays that satisfy every documented invariant, or raises ONE
`DatasetError` line naming the file (and the key when one key is at fault). `pickle` is never
called (it is replaced by a tripwire) and the payload's side effect never happens.

Gin configs (`flowrl.cli.parse_gin`): unknown names, malformed values, values of the wrong type
and missing required values fail at parse time, naming the file and line (or the `--bind`);
a property test binds random literals to typed parameters and checks accept/reject against an
independent type oracle.
"""

from __future__ import annotations

import io
import pickle
import re
import tokenize
import zipfile
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowrl.cli import main, parse_gin
from flowrl.errors import ConfigError, FlowRLError
from flowrl.ogbench.datasets import DatasetError, load_dataset, read_dataset_file
from flowrl.ogbench.domains import DOMAINS

SPEC = DOMAINS["cube-double-play"]
WIDTH = {"observations": SPEC.ob_dim, "actions": SPEC.action_dim, "qpos": SPEC.nq}
REQUIRED = ("observations", "actions", "terminals", "qpos")
FLOAT_KEYS = ("observations", "actions", "qpos")
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Escapes from the loader found by this fuzzing, still open in flowrl/ogbench/datasets.py (see
# test_known_loader_escapes below, which fails loudly once they are fixed): `_read_key` lets
# these through instead of turning them into a DatasetError.
KNOWN_ESCAPES = (MemoryError, RuntimeError, NotImplementedError, tokenize.TokenError)
KNOWN_ESCAPE_TEXT = re.compile(r"Unable to allocate|encrypted|compression method|EOF in multi-line")


# ---------------------------------------------------------------------------------------------
# Pickle tripwires


PAYLOAD_RAN: list[str] = []


def _payload_effect(tag: str) -> str:
    """What unpickling an `Exploit` would run (records that it ran)."""
    PAYLOAD_RAN.append(tag)
    return tag


class Exploit:
    """An object whose unpickling calls `_payload_effect`: the stand-in for malicious code."""

    def __reduce__(self):
        return (_payload_effect, ("unpickled",))


@contextmanager
def pickle_forbidden():
    """Any call into pickle's loaders during the block fails the test."""
    calls: list[str] = []

    def tripwire(*args, **kwargs):
        calls.append("pickle called")
        raise AssertionError("the loader called pickle")

    with mock.patch.object(pickle, "load", tripwire), mock.patch.object(pickle, "loads", tripwire), \
            mock.patch.object(pickle, "Unpickler", tripwire):
        yield calls
    assert not calls, "the loader called pickle"
    assert not PAYLOAD_RAN, "a pickled payload ran"


# ---------------------------------------------------------------------------------------------
# Datasets: building inputs


def valid_raw(rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A valid per-step cube-double-play file: `rows` rows, one or two episodes."""
    terminals = np.zeros(rows, bool)
    terminals[-1] = True
    if rows >= 4:
        terminals[rows // 2] = True
    return {
        "observations": rng.standard_normal((rows, WIDTH["observations"])).astype(np.float32),
        "actions": rng.uniform(-1, 1, (rows, WIDTH["actions"])).astype(np.float32),
        "terminals": terminals,
        "qpos": rng.standard_normal((rows, WIDTH["qpos"])).astype(np.float32),
    }


DTYPES = ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool", "complex64",
          "<U3", "S3", "datetime64[s]", "timedelta64[s]", "record", "object"]


def _as_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "record":
        return np.zeros(array.shape, dtype=[("a", "f4"), ("b", "i4")])
    if dtype == "object":
        return _objects(array.shape)
    if dtype.startswith("datetime") or dtype.startswith("timedelta"):
        return np.zeros(array.shape, dtype=dtype)
    with np.errstate(all="ignore"):
        return array.astype(dtype)


def _objects(shape) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    for index in np.ndindex(*shape):
        out[index] = Exploit()
    return out


MUTATIONS = ("drop", "extra", "dtype", "shape", "width", "rows", "nonfinite", "objects", "terminals",
             "empty", "scalar")


def mutate(raw: dict[str, np.ndarray], kind: str, data) -> str | None:
    """Apply one fault; return the required key it concerns (None for harmless extras)."""
    present = [k for k in REQUIRED if k in raw]
    if kind == "extra":
        name = data.draw(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True).filter(lambda n: n not in REQUIRED))
        shape = tuple(data.draw(st.lists(st.integers(0, 4), max_size=3)))
        raw[name] = _objects(shape) if data.draw(st.booleans()) else np.zeros(shape, np.float32)
        return None
    if not present:
        return None
    key = data.draw(st.sampled_from(present))
    rows = raw[key].shape[0] if raw[key].ndim else 1
    if kind == "drop":
        del raw[key]
    elif kind == "dtype":
        raw[key] = _as_dtype(raw[key], data.draw(st.sampled_from(DTYPES)))
    elif kind == "shape":
        shape = tuple(data.draw(st.lists(st.integers(0, 6), max_size=3)))
        raw[key] = np.zeros(shape, raw[key].dtype)
    elif kind == "width":
        if raw[key].ndim != 2:
            return key
        width = data.draw(st.integers(0, 60).filter(lambda w: w != raw[key].shape[1]))
        raw[key] = np.zeros((rows, width), raw[key].dtype)
    elif kind == "rows":
        new_rows = data.draw(st.integers(0, 9).filter(lambda r: r != rows))
        raw[key] = np.resize(raw[key], (new_rows, *raw[key].shape[1:]))
    elif kind == "nonfinite":
        if raw[key].size == 0 or raw[key].dtype.kind != "f":
            return key
        flat = raw[key].reshape(-1).copy()
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        raw[key] = flat.reshape(raw[key].shape)
    elif kind == "objects":
        raw[key] = _objects(raw[key].shape)
    elif kind == "terminals":
        key = "terminals"
        choice = data.draw(st.sampled_from(["values", "last-open", "all-terminal"]))
        n = raw["terminals"].shape[0] if "terminals" in raw and raw["terminals"].ndim else rows
        if choice == "values":
            raw[key] = np.asarray(data.draw(st.lists(st.integers(-2, 3), min_size=n, max_size=n)), np.int64)
        elif choice == "last-open":
            raw[key] = np.zeros(n, bool)
        else:
            raw[key] = np.ones(n, bool)
    elif kind == "empty":
        for k in present:
            raw[k] = raw[k][:0] if raw[k].ndim else raw[k]
        return "rows"
    elif kind == "scalar":
        raw[key] = np.asarray(raw[key].reshape(-1)[0] if raw[key].size else 0.0)
    return key


def write_npz(path: Path, raw: dict[str, np.ndarray]) -> Path:
    # np.savez stores object arrays as pickles (allow_pickle defaults to True when saving): the
    # files a careless or malicious producer would ship.
    with open(path, "wb") as f:
        np.savez(f, **raw)
    return path


def check_loaded(raw: dict[str, np.ndarray]) -> None:
    """Every invariant `read_dataset_file` documents for what it returns."""
    rows = raw["terminals"].shape[0]
    assert raw["terminals"].dtype == np.bool_ and raw["terminals"].ndim == 1
    assert raw["terminals"][-1] and not raw["terminals"].all() and rows >= 2
    for key in FLOAT_KEYS:
        assert raw[key].shape == (rows, WIDTH[key]), key
        assert np.issubdtype(raw[key].dtype, np.floating) and np.isfinite(raw[key]).all(), key


def check_error(error: BaseException, path: Path, keys: set[str]) -> None:
    assert isinstance(error, DatasetError) and isinstance(error, FlowRLError), repr(error)
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message, message
    if keys:
        names_key = any(key in message for key in keys)
        assert names_key or "terminal" in message or "rows" in message, (message, keys)


def _gist(error: BaseException) -> str:
    """The kind of error, without paths, names and numbers (for hypothesis' statistics)."""
    text = re.sub(r"/\S+", "<file>", str(error))
    text = re.sub(r"\([^)]*\)|'[^']*'|\d+", "_", text)
    return f"{type(error).__name__}: {text[:70]}"


def load(path: Path):
    """(returned arrays, None) or (None, the exception), with pickle forbidden."""
    with pickle_forbidden():
        try:
            return read_dataset_file(path, SPEC), None
        except Exception as error:  # noqa: BLE001 - the property is about which errors escape
            return None, error


# ---------------------------------------------------------------------------------------------
# Datasets: properties


@FUZZ
@given(data=st.data(), rows=st.integers(2, 7), seed=st.integers(0, 2**16),
       kinds=st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3))
def test_fuzzed_keys_load_or_fail_with_one_clear_line(tmp_path, data, rows, seed, kinds):
    raw = valid_raw(rows, np.random.default_rng(seed))
    touched = {key for key in (mutate(raw, kind, data) for kind in kinds) if key}
    path = write_npz(tmp_path / "cube-double-play-v0.npz", raw)
    loaded, error = load(path)
    event("loaded" if error is None else f"refused: {_gist(error)}")
    if error is None:
        check_loaded(loaded)
    else:
        check_error(error, path, touched)
    if set(kinds) == {"extra"}:
        assert error is None, f"extra keys must be ignored, got {error}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("key", REQUIRED)
def test_every_dtype_of_every_key(tmp_path, key, dtype):
    raw = valid_raw(6, np.random.default_rng(0))
    raw[key] = _as_dtype(raw[key], dtype)
    path = write_npz(tmp_path / "cube-double-play-v0.npz", raw)
    loaded, error = load(path)
    accepted = {"float16", "float32", "float64"} if key in FLOAT_KEYS else {
        "float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool", "complex64"}
    if dtype in accepted:
        assert error is None, error
        check_loaded(loaded)
    else:
        check_error(error, path, {key})
        assert key in str(error)


def _zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _valid_bytes(seed: int = 0) -> bytes:
    return _zip_of({f"{k}.npy": _npy(v) for k, v in valid_raw(6, np.random.default_rng(seed)).items()})


WHOLE_FILE = ("random", "truncated", "flipped-data", "pickle-stream", "single-npy", "object-npy",
              "foreign-zip", "bad-header", "empty")


@FUZZ
@given(kind=st.sampled_from(WHOLE_FILE), data=st.data())
def test_fuzzed_files_fail_with_one_clear_line_and_never_unpickle(tmp_path, kind, data):
    good = _valid_bytes()
    if kind == "random":
        blob = data.draw(st.binary(max_size=2000))
    elif kind == "truncated":
        blob = good[: data.draw(st.integers(0, len(good) - 1))]
    elif kind == "flipped-data":
        # A byte inside an array's data (past its .npy header): the member's CRC must catch it.
        start = good.find(b"\x93NUMPY")
        header_end = good.find(b"\n", start) + 1
        position = data.draw(st.integers(header_end, header_end + 6 * 4 * WIDTH["observations"] - 1))
        blob = bytearray(good)
        blob[position] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob)
    elif kind == "pickle-stream":
        blob = pickle.dumps(data.draw(st.sampled_from([Exploit(), {"observations": Exploit()}, [1, 2]])))
    elif kind == "single-npy":
        blob = _npy(np.zeros((data.draw(st.integers(0, 5)), 37), np.float32))
    elif kind == "object-npy":
        blob = _npy(_objects((3,)))
    elif kind == "foreign-zip":
        names = data.draw(st.lists(st.from_regex(r"[a-z]{1,8}(\.npy|\.txt)?", fullmatch=True), max_size=4))
        blob = _zip_of({name: data.draw(st.binary(max_size=50)) for name in names})
    elif kind == "bad-header":
        header = data.draw(st.sampled_from([
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (6, 37), }",
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 37), }",
            b"{'descr': 'not-a-dtype', 'fortran_order': False, 'shape': (6, 37), }",
            b"{'descr': __import__('os').getpid(), 'fortran_order': False, 'shape': (6, 37), }",
            b"[1, 2, 3]",
            b"{'descr': '<f4', 'fortran_order': 'yes', 'shape': (6, 37), }",
        ]))
        npy = b"\x93NUMPY\x01\x00" + len(header + b"\n").to_bytes(2, "little") + header + b"\n"
        members = {f"{k}.npy": _npy(v) for k, v in valid_raw(6, np.random.default_rng(0)).items()}
        members["observations.npy"] = npy + data.draw(st.binary(max_size=64))
        blob = _zip_of(members)
    else:
        blob = b""
    path = tmp_path / "cube-double-play-v0.npz"
    path.write_bytes(blob)
    loaded, error = load(path)
    event(f"{kind}: " + ("loaded" if error is None else _gist(error)))
    if error is None:  # a random blob can only load if it is a valid file
        check_loaded(loaded)
        return
    if isinstance(error, KNOWN_ESCAPES) and KNOWN_ESCAPE_TEXT.search(str(error)):
        return  # documented in test_known_loader_escapes
    check_error(error, path, set())


def test_object_arrays_under_extra_keys_are_never_read(tmp_path):
    raw = valid_raw(6, np.random.default_rng(0))
    raw["notes"] = _objects((4,))
    raw["observations_backup"] = _objects((6, 37))
    loaded, error = load(write_npz(tmp_path / "cube-double-play-v0.npz", raw))
    assert error is None
    check_loaded(loaded)
    assert "notes" not in loaded


def test_load_dataset_end_to_end_rejects_payloads_and_names_the_key(tmp_path):
    """The public loader (what `flowrl train` calls) on a pickled payload and a NaN."""
    raw = valid_raw(6, np.random.default_rng(0))
    raw["qpos"] = _objects(raw["qpos"].shape)
    write_npz(tmp_path / "cube-double-play-v0.npz", raw)
    with pickle_forbidden(), pytest.raises(DatasetError, match=r"key 'qpos' holds an object array"):
        load_dataset("cube-double-play-singletask-v0", tmp_path)
    raw = valid_raw(6, np.random.default_rng(0))
    raw["actions"][4, 1] = np.nan
    write_npz(tmp_path / "cube-double-play-v0.npz", raw)
    with pytest.raises(DatasetError, match=r"key 'actions' has a NaN/inf value at row 4"):
        load_dataset("cube-double-play-singletask-v0", tmp_path)


def _huge_shape_member() -> bytes:
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 37), }"
    return b"\x93NUMPY\x01\x00" + len(header + b"\n").to_bytes(2, "little") + header + b"\n" + b"\0" * 64


def _flag_first_member(blob: bytes, offset: int, value: int) -> bytes:
    """Set a field of the first local header and of the first central-directory entry."""
    data = bytearray(blob)
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + offset] |= value
    data[central + offset + 2] |= value
    return bytes(data)


@pytest.mark.parametrize("case", ["huge-shape", "encrypted", "unknown-compression", "unclosed-header",
                                  "float64-beyond-float32"])
def test_known_loader_escapes(tmp_path, case):
    """Inputs fuzzing found that once escaped the loader as non-DatasetErrors; now one clear line."""
    members = {f"{k}.npy": _npy(v) for k, v in valid_raw(6, np.random.default_rng(0)).items()}
    path = tmp_path / "cube-double-play-v0.npz"
    if case == "huge-shape":  # header claims 160 TiB: MemoryError
        members["observations.npy"] = _huge_shape_member()
        path.write_bytes(_zip_of(members))
    elif case == "encrypted":  # zip flag bit 0: RuntimeError "password required"
        path.write_bytes(_flag_first_member(_zip_of(members), 6, 0x01))
    elif case == "unknown-compression":  # method 99: NotImplementedError
        path.write_bytes(_flag_first_member(_zip_of(members), 8, 99))
    elif case == "unclosed-header":  # tokenize.TokenError from numpy's header parser
        header = b"{'descr': ('<f4'"
        members["observations.npy"] = (b"\x93NUMPY\x01\x00" + len(header + b"\n").to_bytes(2, "little")
                                       + header + b"\n")
        path.write_bytes(_zip_of(members))
    else:  # 1e300 is finite in float64 but inf once the loader casts to float32
        raw = valid_raw(6, np.random.default_rng(0))
        raw["observations"] = raw["observations"].astype(np.float64)
        raw["observations"][2, 3] = 1e300
        write_npz(path, raw)
        with pytest.raises(DatasetError, match=r"'observations' has a NaN/inf value at row 2"):
            load_dataset("cube-double-play-singletask-v0", tmp_path)
        return
    with pickle_forbidden(), pytest.raises(DatasetError):
        read_dataset_file(path, SPEC)


# ---------------------------------------------------------------------------------------------
# Gin


BASE = "include 'qam/cube-double-play.gin'\n# padding comment\n\n"


def write_gin(tmp_path: Path, body: str, name: str = "bad.gin") -> tuple[Path, int]:
    """A config whose last line is `body`; (path, the line number of `body`)."""
    path = tmp_path / name
    path.write_text(BASE + body + "\n")
    return path, BASE.count("\n") + 1


def parse_error(path: Path, bindings=()) -> str:
    import gin

    try:
        with pytest.raises(ConfigError) as raised:
            parse_gin([str(path)], list(bindings))
    finally:
        gin.clear_config()
    message = str(raised.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(("body", "fragment"), [
    ("qamm.inv_temp = 3", "No configurable matching 'qamm'"),
    ("qam.inv_tmp = 3", "doesn't have a parameter named 'inv_tmp'"),
    ("train.extractor = @nosuch()", "No configurable matching reference '@nosuch()'"),
    ("import no_such_module_xyz", "No module named 'no_such_module_xyz'"),
    ("include 'no/such/file.gin'", "Unable to open file: no/such/file.gin"),
    ("train.offline_steps = 10 20", "Expected newline"),
    ("qam.inv_temp = 1.0.0", "line"),
])
def test_gin_unknown_names_and_malformed_values_name_file_and_line(tmp_path, body, fragment):
    path, line = write_gin(tmp_path, body)
    message = parse_error(path)
    assert fragment in message and str(path) in message
    assert f"line {line}" in message, message


@pytest.mark.parametrize(("body", "fragment"), [
    ("qam.flow_steps = '10'", "qam.flow_steps = '10' has the wrong type: expected int, got str"),
    ("train.offline_steps = 1e6", "expected int, got float"),
    ("train.sparse = 1", "expected bool (True/False), got int"),
    ("train.env_name = 5", "expected str (quoted), got int"),
    ("flowrl.AgentConfig.actor_hidden_dims = (256)", "expected tuple[int, ...] (write a tuple"),
    ("flowrl.AgentConfig.actor_hidden_dims = [256, 256]", "got list [256, 256]"),
    ("flowrl.AgentConfig.critic_hidden_dims = (256, 'wide')", "element 1 of (256, 'wide'): expected int"),
    ("flowrl.AgentConfig.discount = 'high'", "AgentConfig.discount = 'high' has the wrong type"),
    ("flowrl.AgentConfig.learning_rate = None", "expected float, got None"),
    ("train.extractor = @flowrl.AgentConfig()", "which builds a AgentConfig"),
    ("train.extractor = @qam", "call it: @qam()"),
    ("train.agent = 'default'", "expected AgentConfig (a reference such as @name()), got str"),
])
def test_gin_wrong_types_fail_at_parse_time_with_file_and_line(tmp_path, body, fragment):
    path, line = write_gin(tmp_path, body)
    message = parse_error(path)
    assert fragment in message, message
    assert str(path) in message and f"line {line}" in message, message


def test_gin_wrong_type_in_an_included_file_names_that_file(tmp_path):
    inner, _ = write_gin(tmp_path, "qam.flow_steps = 2.5", name="inner.gin")
    outer = tmp_path / "outer.gin"
    outer.write_text(f"include '{inner}'\n")
    message = parse_error(outer)
    assert f'In file "{inner}", line 4' in message and "expected int, got float" in message


def test_gin_wrong_type_in_a_binding_names_the_binding(capsys):
    assert main(["train", "qam/scene-play.gin", "--bind", "train.eval_episodes='all'", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bind \"train.eval_episodes='all'\"" in err[0] and "expected int" in err[0]


def test_gin_missing_required_values_are_one_line_naming_them(tmp_path, capsys):
    config = tmp_path / "partial.gin"
    config.write_text("include 'base.gin'\nimport extractors\n")
    assert main(["train", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "missing required gin value(s)" in err[0] and "train.env_name" in err[0] and "train.extractor" in err[0]
    assert str(config) in err[0]

    path, _ = write_gin(tmp_path, "train.env_name = %gin.REQUIRED")
    assert "missing required gin value(s)" in parse_error(path) and "train.env_name" in parse_error(path)
    path, _ = write_gin(tmp_path, "train.env_name = %ENV_NAME")
    assert "%ENV_NAME (used by train.env_name, never defined)" in parse_error(path)
    path, _ = write_gin(tmp_path, "ENV = %gin.REQUIRED\ntrain.env_name = %ENV")
    assert "train.env_name (via %ENV)" in parse_error(path)


def test_gin_unclosed_bracket_is_one_line(tmp_path):
    path, line = write_gin(tmp_path, "qam.hidden_dims = (64,")
    message = parse_error(path)
    assert "never closed" in message and str(path) in message


# The independent oracle: which Python literals each parameter's annotation accepts.
TYPED_PARAMS = {
    "train.offline_steps": lambda v: type(v) is int,
    "train.sparse": lambda v: type(v) is bool,
    "train.env_name": lambda v: type(v) is str,
    "train.eval_max_episode_steps": lambda v: v is None or type(v) is int,
    "train.data_dir": lambda v: v is None or type(v) is str,
    "flowrl.AgentConfig.learning_rate": lambda v: type(v) in (int, float),
    "flowrl.AgentConfig.grad_clip_norm": lambda v: v is None or type(v) in (int, float),
    "flowrl.AgentConfig.actor_hidden_dims": lambda v: type(v) is tuple and all(type(x) is int for x in v),
    "flowrl.AgentConfig.discount": lambda v: type(v) in (int, float, bool),
}
LITERALS = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=8),
    lambda children: st.lists(children, max_size=3) | st.lists(children, max_size=3).map(tuple),
    max_leaves=4,
)


@FUZZ
@given(param=st.sampled_from(sorted(TYPED_PARAMS)), value=LITERALS, padding=st.integers(0, 5))
def test_gin_random_literals_match_the_type_oracle(tmp_path, param, value, padding):
    import gin

    path = tmp_path / "fuzz.gin"
    line = BASE.count("\n") + padding + 1
    path.write_text(BASE + "\n" * padding + f"{param} = {value!r}\n")
    try:
        parse_gin([str(path)], [])
        error = None
    except ConfigError as e:
        error = str(e)
    finally:
        gin.clear_config()
    if TYPED_PARAMS[param](value):
        assert error is None, f"{param} = {value!r} was refused: {error}"
    else:
        assert error is not None, f"{param} = {value!r} was accepted"
        assert "has the wrong type" in error and f"line {line}" in error and str(path) in error, error
