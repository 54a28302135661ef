"""SHA-512 crypt (``$6$``), the format /etc/shadow and the rescue ramdisk expect.

Implemented from the published SHA-crypt specification so the agent does not depend on
the ``crypt`` module (deprecated, gone in Python 3.13) or on a ``mkpasswd`` binary.
"""

from __future__ import annotations

import hashlib
import secrets

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ORDER = ((0, 21, 42), (22, 43, 1), (44, 2, 23), (3, 24, 45), (25, 46, 4), (47, 5, 26),
          (6, 27, 48), (28, 49, 7), (50, 8, 29), (9, 30, 51), (31, 52, 10), (53, 11, 32),
          (12, 33, 54), (34, 55, 13), (56, 14, 35), (15, 36, 57), (37, 58, 16), (59, 17, 38),
          (18, 39, 60), (40, 61, 19), (62, 20, 41))
DEFAULT_ROUNDS = 5000


def _b64(value: int, count: int) -> str:
    out = []
    for _ in range(count):
        out.append(_ITOA64[value & 0x3F])
        value >>= 6
    return "".join(out)


def _repeat(digest: bytes, length: int) -> bytes:
    return (digest * (length // len(digest) + 1))[:length]


def sha512_crypt(password: str, salt: str | None = None, rounds: int = DEFAULT_ROUNDS) -> str:
    """The ``$6$salt$hash`` string for ``password`` (a random 16-character salt if None)."""
    if salt is None:
        salt = "".join(secrets.choice(_ITOA64) for _ in range(16))
    rounds = max(1000, min(rounds, 999_999_999))
    key, salt_bytes = password.encode("utf-8"), salt.encode("ascii")[:16]
    length = len(key)
    b = hashlib.sha512(key + salt_bytes + key).digest()
    a = hashlib.sha512(key + salt_bytes + _repeat(b, length))
    n = length
    while n:
        a.update(b if n & 1 else key)
        n >>= 1
    a_digest = a.digest()
    p = _repeat(hashlib.sha512(key * length).digest(), length)
    s = _repeat(hashlib.sha512(salt_bytes * (16 + a_digest[0])).digest(), len(salt_bytes))
    c = a_digest
    for i in range(rounds):
        h = hashlib.sha512(p if i & 1 else c)
        if i % 3:
            h.update(s)
        if i % 7:
            h.update(p)
        h.update(c if i & 1 else p)
        c = h.digest()
    encoded = "".join(_b64((c[x] << 16) | (c[y] << 8) | c[z], 4) for x, y, z in _ORDER)
    encoded += _b64(c[63], 2)
    prefix = "$6$" if rounds == DEFAULT_ROUNDS else f"$6$rounds={rounds}$"
    return f"{prefix}{salt_bytes.decode('ascii')}${encoded}"
