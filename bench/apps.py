from django.apps import AppConfig


class BenchConfig(AppConfig):
    """Benchmarks and the chaos run: commands that start simulators and hub processes and measure them."""

    name = "bench"
    verbose_name = "Benchmarks"
