"""Small reusable pieces shared by the methods: backbones, metrics, and method building blocks."""
