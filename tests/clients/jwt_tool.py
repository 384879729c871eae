#!/usr/bin/env python3
"""Mints JWTs independently of Tidings' own code (PyJWT + cryptography), for the auth tests.

  jwt_tool.py keys DIR                      RSA-2048 and EC P-256 key pairs as PEM files in DIR
  jwt_tool.py mint ALG KEY CLAIMS_JSON      HS256: KEY is the secret; RS256/ES256: a private PEM file
  jwt_tool.py none CLAIMS_JSON              an unsigned token with "alg": "none"
  jwt_tool.py confuse PUBLIC_PEM CLAIMS     HS256 signed with the RSA *public* key bytes as the
                                            secret (the classic algorithm-confusion attack)
Relative times: a claim value like "+60" or "-60" is now plus/minus that many seconds.
"""
import base64
import hashlib
import hmac
import json
import os
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def claims(text):
    c = json.loads(text)
    for k in ("exp", "nbf", "iat"):
        v = c.get(k)
        if isinstance(v, str) and v[:1] in "+-":
            c[k] = int(time.time()) + int(v)
    return c


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main(argv):
    cmd = argv[1]
    if cmd == "keys":
        out = argv[2]
        for name, key in (("rsa", rsa.generate_private_key(65537, 2048)), ("ec", ec.generate_private_key(ec.SECP256R1()))):
            with open(os.path.join(out, f"{name}.key"), "wb") as f:
                f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
            with open(os.path.join(out, f"{name}.pub"), "wb") as f:
                f.write(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    elif cmd == "mint":
        alg, key = argv[2], argv[3]
        if alg != "HS256":
            with open(key, "rb") as f:
                key = f.read()
        print(jwt.encode(claims(argv[4]), key, algorithm=alg))
    elif cmd == "none":
        header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        print(f"{header}.{b64(json.dumps(claims(argv[2])).encode())}.")
    elif cmd == "confuse":
        with open(argv[2], "rb") as f:
            secret = f.read()
        signing = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims(argv[3])).encode())}"
        sig = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
        print(f"{signing}.{b64(sig)}")
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
