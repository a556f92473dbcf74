"""Offline methods: a frozen, pre-trained teacher supervises the student."""
