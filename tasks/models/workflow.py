from django.db import models

from tasks.fields import JSONField


class Workflow(models.Model):
    """A ComfyUI graph in API format with the parameters a user may set."""

    slug = models.SlugField(max_length=80, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    graph = JSONField(help_text="The graph in ComfyUI's API format.")
    parameters = JSONField(default=list, blank=True, help_text="See the README: workflow file format.")
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name
