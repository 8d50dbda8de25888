"""Package signatures with OpenSSF model-signing in key mode (an elliptic-curve key pair, no network: it suits
offline devices). No cryptography of mmopt's own.

``mmopt package --sign-key private.pem`` signs the finished package folder: model-signing hashes every file
in it (``package.json``, the graphs, ``golden.npz``) and writes ``package.sig`` (a Sigstore bundle) beside
them. ``mmopt-run --public-key public.pem`` verifies that signature before anything in the package is read:
an edited, added or removed file, or another key, refuses the package.

A device given a public key refuses an unsigned package, one signed with another key, and any file that
differs from what was signed. A signed package is refused where no public key is given (its signature could
not be checked). Only devices given ``--public-key`` are protected: without it, deleting ``package.sig``
makes a package unsigned, and an unsigned package is served on its hashes alone.
"""
from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any

SIGNATURE = "package.sig"
INSTALL = "pip install 'mmopt-runtime[sign]' (model-signing and pyopenssl)"


class SignatureError(Exception):
    """The package's signature is missing, invalid, or cannot be checked here."""


def _lib() -> Any:
    try:
        from model_signing import hashing, signing, verifying
    except ImportError as e:
        raise SignatureError(f"signatures need OpenSSF model-signing, which cannot be imported here ({e}): "
                             f"{INSTALL}.") from None
    return hashing, signing, verifying


def _hashing(hashing: Any) -> Any:
    # the signature file itself is the only file of the folder that the signature does not cover
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def sign(folder: Path, private_key: str | os.PathLike) -> Path:
    """Sign every file of ``folder`` with the PEM elliptic-curve ``private_key``; returns the signature's path."""
    hashing, signing, _ = _lib()
    if not Path(private_key).is_file():
        raise SignatureError(f"--sign-key {private_key}: no such file. Give a PEM elliptic-curve private key "
                             "(e.g. `openssl ecparam -name prime256v1 -genkey -noout -out key.pem`).")
    try:
        signing.Config().set_hashing_config(_hashing(hashing)).use_elliptic_key_signer(
            private_key=Path(private_key)).sign(folder, folder / SIGNATURE)
    except Exception as e:  # ValueError, TypeError, AttributeError (an RSA key) from model-signing
        raise SignatureError(f"--sign-key {private_key}: cannot sign with it ({e}). Give an unencrypted PEM "
                             "elliptic-curve private key.") from None
    return folder / SIGNATURE


def verify(folder: Path, public_key: str | os.PathLike | None) -> dict[str, str] | None:
    """Check ``folder``'s signature against ``public_key``: the sha256 of every file the verified signature
    covers ({relative path: digest}), or None when the package is unsigned and no key was given; raises
    ``SignatureError`` in every other case.

    The signature's bytes are read once: model-signing verifies a private copy of them and the digests are
    taken from those same bytes. The caller must then hold what it reads (``package.json`` first) to these
    digests: files swapped on disk after the check are caught there, not trusted."""
    signature = folder / SIGNATURE
    if public_key is None:
        if signature.exists():
            raise SignatureError(f"{signature}: the package is signed, but no public key was given to check it "
                                 "with. Pass --public-key (Package.load(..., public_key=...)) with the signer's "
                                 "public key.")
        return None
    if not Path(public_key).is_file():
        raise SignatureError(f"--public-key {public_key}: no such file.")
    if not folder.is_dir():
        raise SignatureError(f"{folder}: no such package folder.")
    try:
        data = signature.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"{folder}: unsigned (no {SIGNATURE}), but a public key was given: this device only "
                             "serves signed packages. Sign it with `mmopt package --sign-key`.") from None
    hashing, _, verifying = _lib()
    with tempfile.TemporaryDirectory() as private:
        copy = Path(private) / SIGNATURE
        copy.write_bytes(data)
        try:
            verifying.Config().set_hashing_config(_hashing(hashing)).use_elliptic_key_verifier(
                public_key=Path(public_key)).verify(folder, copy)
        except Exception as e:  # model-signing raises ValueError for mismatches, others for malformed bundles
            raise SignatureError(f"{signature}: the signature does not verify with {public_key} ({e}). Do not "
                                 "serve this package: copy it again from the build machine, or check the "
                                 "key.") from None
    try:
        statement = json.loads(base64.b64decode(json.loads(data)["dsseEnvelope"]["payload"]))
        return {r["name"]: r["digest"] for r in statement["predicate"]["resources"] if r["algorithm"] == "sha256"}
    except (ValueError, KeyError, TypeError) as e:
        raise SignatureError(f"{signature}: verified, but its payload is not model-signing's file list ({e}).") \
            from None
