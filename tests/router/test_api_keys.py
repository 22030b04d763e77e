"""Router API keys: where they come from and what an Authorization header must carry."""

from __future__ import annotations

import pytest

from epd.workers.security.api_keys import API_KEYS_ENV, APIKeys, api_keys_from


def test_keys_from_flags_files_and_the_environment(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\n\nfile-key-1\n  file-key-2  \n")
    keys = api_keys_from(["flag-key"], [str(key_file)], {API_KEYS_ENV: "env-a, env-b,,"})
    assert keys.required and len(keys.digests) == 5
    for key in ("flag-key", "file-key-1", "file-key-2", "env-a", "env-b"):
        assert keys.accepts(f"Bearer {key}"), key


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer wrong", "Basic flag-key", "flag-key",
                                    "Bearer flag-key2", "Bearer flag-ke"])
def test_anything_but_the_bearer_key_is_refused(header):
    assert not APIKeys.of(["flag-key"]).accepts(header)


def test_the_scheme_is_case_insensitive_and_spaces_around_the_key_do_not_matter():
    keys = APIKeys.of(["k1"])
    assert keys.accepts("bearer k1") and keys.accepts("Bearer  k1 ")


def test_no_keys_means_open():
    assert not api_keys_from([], [], {}).required


def test_unreadable_or_empty_key_files_are_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="holds no key"):
        api_keys_from([], [str(empty)], {})
    with pytest.raises(ValueError, match="missing"):
        api_keys_from([], [str(tmp_path / "missing")], {})
