"""Configuration: typed, validated at start-up, every bad value names its key."""

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkws import config
from streamkws.errors import ConfigError


def test_defaults_are_valid_and_documented_values():
    cfg = config.Config().validate()
    assert cfg.frontend.n_mels == 40 and cfg.windows.hop_ms == 100
    assert cfg.windows.hop_frames(cfg.frontend) == 10


def test_a_toml_file_overrides_only_what_it_names(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[vad]\nkind = "energy"\n[windows]\nhop_ms = 200\n')
    cfg = config.load(p)
    assert cfg.vad.kind == "energy" and cfg.windows.hop_ms == 200
    assert cfg.frontend == config.Config().frontend


@pytest.mark.parametrize(
    ("toml", "key", "why"),
    [
        ("[vad]\nagressiveness = 2\n", "vad.agressiveness", "did you mean 'vad.aggressiveness'"),
        ("[nope]\nx = 1\n", "nope", "unknown key"),
        ("[windows]\nhop_ms = '100'\n", "windows.hop_ms", "must be an integer"),
        ("[windows]\nhop_ms = 105\n", "windows.hop_ms", "multiple of frontend.hop_ms"),
        ("[frontend]\nn_mels = 0\n", "frontend.n_mels", "within"),
        ("[audio]\nrealtime = 1\n", "audio.realtime", "true or false"),
        ("[audio]\nring_seconds = 0.1\n", "audio.ring_seconds", "within"),
        ("vad = 3\n", "vad", "must be a table"),
        # Only this process could subscribe to it: a publisher nobody can reach.
        ("[publish]\nendpoint = 'inproc://kws'\n", "publish.endpoint",
         "must start with tcp:// or ipc://"),
    ],
)
def test_bad_values_name_their_key(tmp_path, toml, key, why):
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError) as exc:
        config.load(p)
    assert exc.value.key == key and why in str(exc.value)


def test_unparseable_and_missing_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[vad\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="cannot read config file") as exc:
        config.load(tmp_path / "missing.toml")
    assert str(exc.value).startswith(f"{tmp_path / 'missing.toml'}: ")  # a file, not a key


def test_relative_paths_in_a_config_file_are_taken_from_its_folder(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    folder = folder.resolve()
    p = folder / "c.toml"
    p.write_text('[audio]\nsource = "wav:rec/a.wav"\n[model]\nname = "models/my.skw"\n'
                 '[publish]\ncurve_secret_key = "keys/server.key_secret"\n'
                 'curve_authorized_keys = "/abs/clients"\n')
    cfg = config.load(p)
    assert cfg.audio.source == f"wav:{folder}/rec/a.wav"
    assert cfg.model.name == f"{folder}/models/my.skw"
    assert cfg.publish.curve_secret_key == f"{folder}/keys/server.key_secret"
    assert cfg.publish.curve_authorized_keys == "/abs/clients"
    # A bundled model's name, a file name with a suffix, and a home-relative path.
    p.write_text('[model]\nname = "accurate"\n[audio]\nsource = "mic:USB"\n')
    assert (config.load(p).model.name, config.load(p).audio.source) == ("accurate", "mic:USB")
    p.write_text('[model]\nname = "my.skw"\n')
    assert config.load(p).model.name == f"{folder}/my.skw"
    p.write_text('[model]\nname = "~/my.skw"\n')
    assert config.load(p).model.name == str(Path.home() / "my.skw")
    # Anything not a bundled model's name is a path, with or without a suffix.
    p.write_text('[model]\nname = "mymodel"\n')
    assert config.load(p).model.name == f"{folder}/mymodel"
    p.write_text('[model]\nname = "~nosuchuser1234/my.skw"\n')
    with pytest.raises(ConfigError) as exc:
        config.load(p)
    assert exc.value.key == "model.name" and "no such user" in str(exc.value)


def test_search_order_is_flag_then_environment_then_system(tmp_path, monkeypatch):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    monkeypatch.setenv("STREAMKWS_CONFIG", str(b))
    assert config.find_config_file(a) == a
    assert config.find_config_file(None) == b
    monkeypatch.delenv("STREAMKWS_CONFIG")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", tmp_path / "none.toml")
    assert config.find_config_file(None) is None


def test_a_config_nobody_named_says_where_it_came_from(tmp_path, monkeypatch):
    """An unreadable /etc/streamkws/streamkws.toml stops every user's `streamkws run`: the
    error must say that the search order found it, and how to pick another."""
    monkeypatch.delenv("STREAMKWS_CONFIG", raising=False)
    folder = tmp_path / "streamkws.toml"
    folder.mkdir()  # a folder where the file belongs (root reads any file, so not 0600)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", folder)
    with pytest.raises(ConfigError, match=r"streamkws.toml: cannot read config file \(Is a "
                       r"directory\) \(the system config, which the search order finds; "
                       r"--config FILE picks another\)$"):
        config.load_default(None)
    monkeypatch.setenv("STREAMKWS_CONFIG", str(tmp_path / "none.toml"))
    with pytest.raises(ConfigError, match=r"none.toml: cannot read config file \(No such "
                       r"file or directory\) \(named by \$STREAMKWS_CONFIG\)$"):
        config.load_default(None)
    with pytest.raises(ConfigError, match=r"\(No such file or directory\)$"):
        config.load_default(tmp_path / "none.toml")  # named here: nothing to add
    bad = tmp_path / "bad.toml"
    bad.write_text("[detect]\nthreshold = 7\n")
    monkeypatch.setenv("STREAMKWS_CONFIG", str(bad))
    with pytest.raises(ConfigError) as err:
        config.load_default(None)
    assert err.value.key == "detect.threshold"
    assert str(err.value).endswith(f"(in {bad}, named by $STREAMKWS_CONFIG)")


_values = st.one_of(st.integers(-5, 10_000), st.floats(allow_nan=True), st.booleans(),
                    st.text(max_size=8), st.lists(st.integers(), max_size=2))


@settings(max_examples=200, deadline=None)
@given(
    section=st.sampled_from(["audio", "frontend", "windows", "vad", "bogus"]),
    key=st.sampled_from(["source", "block_ms", "ring_seconds", "realtime", "n_mels", "hop_ms",
                         "f_max", "window_frames", "kind", "aggressiveness", "frame_ms", "zz"]),
    value=_values,
)
def test_any_input_either_parses_or_raises_a_config_error(section, key, value):
    try:
        cfg = config.parse({section: {key: value}})
    except ConfigError as exc:
        assert exc.key.startswith(section)
    else:
        assert getattr(getattr(cfg, section), key) == value


def test_default_toml_documents_every_key_with_its_default():
    import dataclasses
    import tomllib

    from tests.conftest import REPO

    text = (REPO / "configs" / "default.toml").read_text()
    data = tomllib.loads(text)
    defaults = config.Config()
    for section in dataclasses.fields(defaults):
        obj = getattr(defaults, section.name)
        documented = data.get(section.name, {})
        for f in dataclasses.fields(obj):
            if getattr(obj, f.name) is None:  # unset by default: shown commented out
                assert f.name not in documented, f"{section.name}.{f.name} must stay unset"
                assert f"\n# {f.name} = " in text, f"{section.name}.{f.name} not documented"
                continue
            assert f.name in documented, f"{section.name}.{f.name} missing from default.toml"
            value = getattr(obj, f.name)
            value = list(value) if isinstance(value, tuple) else value
            assert documented[f.name] == value, f"{section.name}.{f.name}"
    assert config.parse(data) == defaults


def test_the_raspberry_pi_config_is_valid_and_lighter():
    from tests.conftest import REPO

    pi = config.load(REPO / "configs" / "raspberry-pi.toml")
    default = config.Config()
    assert pi.windows.hop_ms > default.windows.hop_ms
    assert pi.vad.kind == "webrtc" and pi.model.threads == 1
