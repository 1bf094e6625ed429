"""Libraries that measure models: complexity/FLOPs (paper protocol and as built), the memory estimate, and
the speed benchmark. Their command lines are in `piip.tools`."""
