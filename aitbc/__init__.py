"""AITBC shared core: keys and signing, addresses, config, logging, gRPC plumbing."""
