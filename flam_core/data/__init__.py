"""Data: source library, captions, mixture recipes, mixing, shards, loaders, validation."""
