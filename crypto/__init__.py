"""Shallot cryptography: keys, descriptors, link handshake, circuit handshake, onion layers.

Pure code: every function takes its randomness as an argument; nothing here reads a clock or opens
a socket. All primitives come from the ``cryptography`` package.
"""
