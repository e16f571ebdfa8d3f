"""``chatmem token encode|decode``: HMAC secrets, PEM keys, expiry, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from jwt_keys import SECRET, private_pem, public_pem, raw_token

from chatmem.cli import main

SEED = '{"team_id": "tenstorrent", "token_id": "debug-test"}'


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(["token", *args])
    except SystemExit as exc:  # argparse refusals
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out.strip(), err


def test_seed_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    code, encoded, _ = run(capsys, "encode", "--secret", SECRET, SEED)
    assert code == 0
    assert jwt.get_unverified_header(encoded)["alg"] == "HS256"
    assert jwt.decode(encoded, SECRET, algorithms=["HS256"]) == json.loads(SEED)
    code, decoded, _ = run(capsys, "decode", "--secret", SECRET, encoded)
    assert (code, json.loads(decoded)) == (0, json.loads(SEED))


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_decode_with_a_secret_verifies_every_hmac_algorithm(
    capsys: pytest.CaptureFixture[str], alg: str
) -> None:
    # The contract's decode takes no --alg: what encode --alg HS512 signed must verify.
    _, encoded, _ = run(capsys, "encode", "--secret", SECRET, "--alg", alg, SEED)
    assert jwt.get_unverified_header(encoded)["alg"] == alg
    code, decoded, _ = run(capsys, "decode", "--secret", SECRET, encoded)
    assert (code, json.loads(decoded)) == (0, json.loads(SEED))
    code, _, err = run(capsys, "decode", "--secret", SECRET, "--alg", "HS256", encoded)
    assert code == 1 and "invalid token" in err  # an --alg given is still the only one
    code, _, err = run(capsys, "decode", "--secret", "other", encoded)
    assert code == 1 and "Signature verification failed" in err


def test_exp(capsys: pytest.CaptureFixture[str]) -> None:
    before = int(time.time())
    _, encoded, _ = run(capsys, "encode", "--secret", SECRET, "--exp", "60", SEED)
    exp = jwt.decode(encoded, SECRET, algorithms=["HS256"])["exp"]
    assert before + 60 <= exp <= int(time.time()) + 60
    _, expired, _ = run(capsys, "encode", "--secret", SECRET, "--exp", "-10", SEED)
    code, _, err = run(capsys, "decode", "--secret", SECRET, expired)
    assert code == 1 and "Signature has expired" in err


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA")])
def test_pem_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str, alg: str) -> None:
    private, public = tmp_path / "private.pem", tmp_path / "public.pem"
    private.write_text(private_pem(kind))
    public.write_text(public_pem(kind))
    code, encoded, _ = run(capsys, "encode", "--key", str(private), "--alg", alg, SEED)
    assert code == 0 and jwt.get_unverified_header(encoded)["alg"] == alg
    code, decoded, _ = run(capsys, "decode", "--key", str(public), "--alg", alg, encoded)
    assert (code, json.loads(decoded)) == (0, json.loads(SEED))


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA")])
def test_a_key_of_the_wrong_kind_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str, alg: str
) -> None:
    """A public key to sign with was a traceback (``AttributeError: ... no attribute
    'sign'``), a key of another family quoted PyJWT's ``<generator object ...>``; a
    private key verifies, as its public half would."""
    private, public, other = tmp_path / "private.pem", tmp_path / "public.pem", tmp_path / "o.pem"
    private.write_text(private_pem(kind))
    public.write_text(public_pem(kind))
    other.write_text(private_pem("ec" if kind == "rsa" else "rsa"))
    code, out, err = run(capsys, "encode", "--key", str(public), "--alg", alg, SEED)
    assert (code, out) == (2, "")
    assert err == f"chatmem token: {alg} signs with a private key; --key holds a public one\n"
    code, out, err = run(capsys, "encode", "--key", str(other), "--alg", alg, SEED)
    assert (code, out) == (2, "")
    assert err == f"chatmem token: --key does not hold a key {alg} can use\n"
    code, encoded, _ = run(capsys, "encode", "--key", str(private), "--alg", alg, SEED)
    code, decoded, err = run(capsys, "decode", "--key", str(private), "--alg", alg, encoded)
    assert (code, json.loads(decoded)) == (0, json.loads(SEED)), err
    code, out, err = run(capsys, "decode", "--key", str(other), "--alg", alg, encoded)
    assert (code, out) == (2, "") and "does not hold a key" in err


def test_refusals(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    unsigned = raw_token({"alg": "none"}, json.loads(SEED), None)
    assert run(capsys, "decode", "--secret", "", "--alg", "none", unsigned)[0] == 2
    code, _, err = run(capsys, "decode", "--secret", SECRET, unsigned)
    assert code == 1 and "invalid token" in err
    code, _, err = run(
        capsys,
        "decode",
        "--secret",
        "wrong-" + SECRET,
        raw_token({"alg": "HS256"}, json.loads(SEED), SECRET.encode()),
    )
    assert code == 1 and "Signature verification failed" in err
    code, _, err = run(capsys, "encode", "--secret", SECRET, "--alg", "RS256", SEED)
    assert code == 2 and "RS256 needs --key" in err
    code, _, err = run(capsys, "encode", "--secret", SECRET, "[1, 2]")
    assert code == 2 and "claims must be a JSON object" in err
    code, _, err = run(capsys, "encode", "--secret", SECRET, '{"team_id": "a"')
    assert code == 2 and "claims are not valid JSON" in err
    # Python's json writes NaN and Infinity; no JWT library reads them back.
    for constant in ("NaN", "Infinity", "-Infinity"):
        code, out, err = run(capsys, "encode", "--secret", SECRET, f'{{"n": {constant}}}')
        assert code == 2 and f"{constant} is not a JSON number" in err and out == ""
    for number in ("1e999", "-1E400"):  # json reads them as infinities, without a word
        code, out, err = run(capsys, "encode", "--secret", SECRET, f'{{"exp": {number}}}')
        assert code == 2 and f"{number} is too large for a JSON number" in err and out == ""
    code, _, err = run(
        capsys, "encode", "--key", str(tmp_path / "missing.pem"), "--alg", "RS256", SEED
    )
    assert code == 2 and "cannot read key file" in err
    assert SECRET not in err


def test_the_seed_s_order_works_too(capsys: pytest.CaptureFixture[str]) -> None:
    """jwt_util.py took its secret before the command: ``--secret S encode '{...}'``."""
    code, encoded, _ = run(capsys, "--secret", SECRET, "encode", SEED)
    assert code == 0 and jwt.decode(encoded, SECRET, algorithms=["HS256"]) == json.loads(SEED)
    code, decoded, _ = run(capsys, "--secret", SECRET, "decode", encoded)
    assert (code, json.loads(decoded)) == (0, json.loads(SEED))
    code, _, err = run(capsys, "--secret", SECRET, "encode", "--secret", "other", SEED)
    assert code == 2 and "--secret given twice" in err
    code, _, err = run(capsys, "encode", SEED)
    assert code == 2 and "give one of --secret" in err


def test_a_short_secret_is_one_warning_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, encoded, err = run(capsys, "encode", "--secret", "short", SEED)
    assert code == 0 and encoded.count(".") == 2
    assert err.splitlines() == [
        "chatmem token: warning: The HMAC key is 5 bytes long, which is below the minimum"
        " recommended length of 32 bytes for SHA256. See RFC 7518 Section 3.2."
    ]


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """``chatmem token encode ... | head -c 20``: the pipe closes before the token is
    written; the command ends with status 1 and says nothing on stderr, as Unix tools do."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command writes: every write fails
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatmem",
                "token",
                "--secret",
                "s" * 32,
                "encode",
                '{"team_id": "t", "token_id": "x"}',
            ],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 1
    assert result.stderr == ""


def test_a_broken_pipe_that_is_not_standard_output_still_fails_loudly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``BrokenPipeError`` from a socket (a database's) is no reader that stopped early:
    it is not swallowed into a quiet status 1."""
    from chatmem import cli

    def broken(_argv: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_main", broken)
    with pytest.raises(BrokenPipeError):
        cli.main([])
