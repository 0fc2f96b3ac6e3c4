from django.db import models

from tasks.fields import JSONField


class PreviewMethod(models.TextChoices):
    # ComfyUI's extra_data.preview_method values (servers 0.5 and later read it per prompt).
    AUTO = "auto", "auto"
    LATENT2RGB = "latent2rgb", "latent2rgb (fast, rough)"
    TAESD = "taesd", "taesd (better, needs the TAESD models)"
    DEFAULT = "default", "the server's own setting"
    NONE = "none", "no previews"


class Workflow(models.Model):
    """A ComfyUI graph in API format with the parameters a user may set."""

    slug = models.SlugField(max_length=80, unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    graph = JSONField(help_text="The graph in ComfyUI's API format.")
    parameters = JSONField(default=list, blank=True, help_text="See the README: workflow file format.")
    preview_method = models.CharField(
        max_length=16, choices=PreviewMethod.choices, default=PreviewMethod.AUTO,
        help_text="How servers that support it (ComfyUI 0.5 and later) draw sampler previews for this workflow.",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def first_parameter(self, type_):
        """The name of the first parameter of `type_` ("seed", "text"…), or None when there is none."""
        return next((p["name"] for p in self.parameters if p.get("type") == type_), None)
