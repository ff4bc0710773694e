"""crypt(3) password hashes: check ``$6$``/``$5$`` (SHA-crypt) and ``$2a$``/``$2b$``/``$2y$``
(bcrypt), make ``$6$``; and ``pigeon encrypt``, the equivalent of ``smtpctl encrypt``.

SHA-crypt is implemented here from Ulrich Drepper's published specification ("Unix crypt
using SHA-256 and SHA-512"), on top of :mod:`hashlib`: the stdlib ``crypt`` module is
deprecated (gone in 3.13) and ``passlib`` is unmaintained. bcrypt comes from the maintained
``bcrypt`` package. Any other scheme (``$y$`` yescrypt, the Debian default in /etc/shadow,
``$1$`` MD5, ...) is handed to the system's libxcrypt through :mod:`ctypes` when it is there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import hmac
import re
import secrets
import sys
from collections.abc import Callable

# The crypt(3) base-64 alphabet (not RFC 4648's).
ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

SALT_LENGTH = 16  # what smtpctl encrypt generates, and SHA-crypt's maximum
ROUNDS_DEFAULT = 5000
ROUNDS_MIN = 1000
ROUNDS_MAX = 999_999_999
BCRYPT_MAX_BYTES = 72  # crypt(3) ignores what follows; the bcrypt package refuses it

_SHA_SETTING = re.compile(r"\$(?P<id>[56])\$(?:rounds=(?P<rounds>[0-9]+)\$)?(?P<salt>[^$]*)")


def _to_bytes(text: str) -> bytes:
    # surrogateescape: a password read from a non-UTF-8 stdin keeps its exact bytes
    return text.encode("utf-8", "surrogateescape")


def _b64_from_24bit(b2: int, b1: int, b0: int, count: int) -> str:
    value = (b2 << 16) | (b1 << 8) | b0
    chars = []
    for _ in range(count):
        chars.append(ITOA64[value & 0x3F])
        value >>= 6
    return "".join(chars)


def _repeat_to(block: bytes, length: int) -> bytes:
    """``block`` repeated, cut to ``length`` bytes (the spec's P and S sequences)."""
    return (block * (length // len(block) + 1))[:length]


def _encode_sha512(d: bytes) -> str:
    # the spec's byte order: triples (i*22, i*22+21, i*22+42) mod 63, then byte 63 alone
    out = []
    for i in range(21):
        a = (i * 22) % 63
        out.append(_b64_from_24bit(d[a], d[(a + 21) % 63], d[(a + 42) % 63], 4))
    out.append(_b64_from_24bit(0, 0, d[63], 2))
    return "".join(out)


def _encode_sha256(d: bytes) -> str:
    # triples (i*21, i*21+10, i*21+20) mod 30, then bytes 31 and 30
    out = []
    for i in range(10):
        a = (i * 21) % 30
        out.append(_b64_from_24bit(d[a], d[(a + 10) % 30], d[(a + 20) % 30], 4))
    out.append(_b64_from_24bit(0, d[31], d[30], 3))
    return "".join(out)


def sha_crypt(password: bytes, setting: str) -> str | None:
    """The SHA-crypt hash of ``password`` for ``setting`` (``$6$[rounds=N$]salt[$...]`` or
    ``$5$...``); None if ``setting`` is not a SHA-crypt setting."""
    m = _SHA_SETTING.match(setting)
    if m is None:
        return None
    sha512 = m["id"] == "6"
    new: Callable[[bytes], hashlib._Hash] = hashlib.sha512 if sha512 else hashlib.sha256
    salt = _to_bytes(m["salt"])[:SALT_LENGTH]
    rounds = ROUNDS_DEFAULT
    if m["rounds"] is not None:
        rounds = min(max(int(m["rounds"]), ROUNDS_MIN), ROUNDS_MAX)

    key_len = len(password)
    b = new(password + salt + password).digest()
    a = new(password + salt + _repeat_to(b, key_len))
    n = key_len
    while n > 0:  # one step per bit of the key length, lowest first
        a.update(b if n & 1 else password)
        n >>= 1
    c = a.digest()

    p_seq = _repeat_to(new(password * key_len).digest(), key_len)
    s_seq = _repeat_to(new(salt * (16 + c[0])).digest(), len(salt))

    for i in range(rounds):
        ctx = new(p_seq if i & 1 else c)
        if i % 3:
            ctx.update(s_seq)
        if i % 7:
            ctx.update(p_seq)
        ctx.update(c if i & 1 else p_seq)
        c = ctx.digest()

    prefix = f"${m['id']}$"
    if m["rounds"] is not None:
        prefix += f"rounds={rounds}$"
    encoded = _encode_sha512(c) if sha512 else _encode_sha256(c)
    return f"{prefix}{salt.decode('utf-8', 'surrogateescape')}${encoded}"


def _bcrypt_check(password: bytes, hashed: str) -> bool:
    import bcrypt  # imported here: only bcrypt hashes need the package

    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], hashed.encode("ascii"))
    except ValueError:  # malformed hash (or non-ASCII)
        return False


@functools.cache
def _libcrypt() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("crypt")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        func = lib.crypt_rn  # libxcrypt's reentrant crypt, present on current Linux systems
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    func.restype = ctypes.c_char_p
    return lib


CRYPT_DATA_SIZE = 32768  # sizeof(struct crypt_data) in libxcrypt


def system_crypt(password: bytes, setting: str) -> str | None:
    """crypt(3) from the system's libxcrypt, for schemes Pigeon does not implement; None
    when the library is missing or refuses the setting."""
    lib = _libcrypt()
    if lib is None or "\0" in setting or b"\0" in password:
        return None
    data = ctypes.create_string_buffer(CRYPT_DATA_SIZE)
    result = lib.crypt_rn(password, setting.encode("utf-8", "surrogateescape"), data, len(data))
    if not result or result.startswith(b"*"):
        return None
    return str(result.decode("utf-8", "surrogateescape"))


def verify_password(password: str, hashed: str) -> bool:
    """True if ``password`` matches the crypt(3) hash ``hashed``.

    As OpenSMTPD's ``crypt_checkpass``: an empty hash matches only the empty password.
    The final comparison takes constant time.
    """
    if hashed == "":
        return password == ""
    secret = _to_bytes(password)
    if hashed.startswith(("$2a$", "$2b$", "$2y$")):
        return _bcrypt_check(secret, hashed)
    computed = sha_crypt(secret, hashed)
    if computed is None:
        computed = system_crypt(secret, hashed)
    if computed is None:
        return False
    return hmac.compare_digest(_to_bytes(computed), _to_bytes(hashed))


def make_salt(length: int = SALT_LENGTH) -> str:
    return "".join(secrets.choice(ITOA64) for _ in range(length))


def hash_password(password: str) -> str:
    """A ``$6$`` hash with a random 16-character salt and the default rounds, as
    ``smtpctl encrypt`` makes on Linux."""
    result = sha_crypt(_to_bytes(password), f"$6${make_salt()}$")
    assert result is not None
    return result


def encrypt_main(argv: list[str]) -> int:
    """``pigeon encrypt [PASSWORD]``: print the hash of PASSWORD, or of each line read from
    standard input when no argument is given (as smtpctl's ``encrypt`` helper)."""
    args = argv[1:] if argv[:1] == ["--"] else argv
    if len(args) > 1:
        print("usage: pigeon encrypt [string]", file=sys.stderr)
        return 1
    if args:
        print(hash_password(args[0]))
        return 0
    for line in sys.stdin:
        print(hash_password(line.removesuffix("\n")), flush=True)
    return 0
