"""Test support that ships with Strata: a simulated asynchronous device for CPU machines
(``strata.testing.sim``)."""
