"""The scheduler service: a Redis-leased leader runs the policy and applies its decisions."""
