"""Who is asking, and what they may do: WLCG bearer tokens, service tokens, anonymous access.

* :mod:`.scopes`: the WLCG storage scopes (``storage.read:/``) and the Principal a request acts as;
* :mod:`.keys`: each issuer's signing keys, from its discovery document and JWKS (or a local file);
* :mod:`.bearer`: checking a JWT (PyJWT does the cryptography) into a Principal;
* :mod:`.service`: long random tokens for service accounts, stored hashed in a file;
* :mod:`.access`: the Authenticator the web layer asks, with a cache of checked tokens.

The web layer decides which scope a request needs (``pacifica_like.web.authz``).
"""
