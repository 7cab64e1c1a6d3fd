"""Test infrastructure helpers (containers, hosts) shared by trackgate's slower test tiers."""
