"""Online methods: networks trained together from scratch teach each other."""
