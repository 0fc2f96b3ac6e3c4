"""The submit form, generated from a workflow's declared parameters."""

import contextlib
import secrets
import uuid

from django import forms
from django.conf import settings
from django.db import transaction

from tasks.models import Upload
from tasks.params import SEED_MAX, BindingError, color_hex, is_multiline, label_of
from tasks.quota import StorageFull
from tasks.storage import StorageUnavailable
from tasks.submission import QuotaExceeded, create_task, read_image, store_upload

BATCH_MAX = 8

STORAGE_DOWN = "Hub storage did not answer, so nothing was saved; try again in a moment."


def random_field_name(name):
    return f"{name}_random"


def kept_field_name(name):
    """The hidden field that holds an image already stored: chosen before a failed submit, or by "Edit and run"."""
    return f"{name}_upload"


class ColorInput(forms.TextInput):
    input_type = "color"


class ColorField(forms.CharField):
    """A colour picker: the browser sends #rrggbb; tasks.params.bind turns it into ComfyUI's 24-bit number."""

    widget = ColorInput

    def prepare_value(self, value):
        return value if isinstance(value, str) and value.startswith("#") else color_hex(value)


class WorkflowForm(forms.Form):
    """
    One field per declared parameter, and how many tasks to run. The fields give the browser its hints (min, max,
    step, a colour picker) and catch the obvious; tasks.params.bind stays the one judge, and its complaints land
    on the fields they name. A valid image is kept (stored as the user's upload) when another field is wrong, so
    the user never picks it twice.
    """

    def __init__(self, workflow, user, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.workflow = workflow
        self.user = user
        self.declared = {param["name"]: param for param in workflow.parameters}
        self.kept = {}  # image parameter -> the Upload it holds
        for name, param in self.declared.items():
            self.fields[name] = self.field_for(param)
            if param["type"] == "seed":
                random = param.get("random", True) is not False
                self.fields[random_field_name(name)] = forms.BooleanField(
                    label="random", required=False, initial=random
                )
                if random:
                    self.fields[name].initial = None  # a seed shown beside a ticked "random" would contradict it
            if param["type"] == "image":
                self.fields[kept_field_name(name)] = forms.CharField(required=False, widget=forms.HiddenInput)
        self.batch_name = "batch_count" if "batch" in self.declared else "batch"
        self.fields[self.batch_name] = forms.IntegerField(
            label="Images to make",
            min_value=1,
            max_value=BATCH_MAX,
            initial=1,
            required=False,
            help_text="Each gets the next seed.",
            widget=forms.NumberInput(attrs={"class": "batch"}),
        )

    def rows(self):
        """Per parameter, for the template: its bound field, its "random" toggle, its kept image and that field."""
        for name in self.declared:
            toggle, kept = random_field_name(name), kept_field_name(name)
            yield {
                "field": self[name],
                "random": self[toggle] if toggle in self.fields else None,
                "kept_field": self[kept] if kept in self.fields else None,
                "kept": self.kept.get(name) or self._initial_upload(name),
            }

    def _initial_upload(self, name):
        """The image "use these settings" starts from, before any submit."""
        pk = self.initial.get(kept_field_name(name)) if not self.is_bound else None
        if pk and name not in self.kept:
            self.kept[name] = self.own_upload(pk)
        return self.kept.get(name)

    def field_for(self, param):
        kind = param["type"]
        required = param.get("required", True) is not False
        common = {
            "label": label_of(param),
            "help_text": param.get("help", ""),
            "required": required and kind != "seed",
            "initial": param.get("default"),
        }
        if kind == "text":
            widget = forms.Textarea(attrs={"rows": 3}) if is_multiline(param) else forms.TextInput()
            if not required:
                common["help_text"] = common["help_text"] or "May be left empty."
            return forms.CharField(max_length=param.get("max_length", 10_000), widget=widget, strip=False, **common)
        if kind in ("int", "float"):
            field = forms.IntegerField if kind == "int" else forms.FloatField
            attrs = {} if kind == "int" else {"step": "any"}
            return field(
                min_value=param.get("min"),
                max_value=param.get("max"),
                step_size=param.get("step"),
                widget=forms.NumberInput(attrs),
                **common,
            )
        if kind == "seed":
            common["help_text"] = common["help_text"] or "Leave “random” ticked for a new seed on every run."
            return forms.IntegerField(min_value=0, max_value=SEED_MAX, **common)
        if kind == "choice":
            return forms.ChoiceField(choices=[(str(choice), str(choice)) for choice in param["choices"]], **common)
        if kind == "color":
            return ColorField(**common)
        if kind == "image":
            common["required"] = False  # a kept upload may stand for the file: clean() asks for one or the other
            limit = settings.COMFYHUB["MAX_UPLOAD_BYTES"]
            return forms.FileField(
                widget=forms.ClearableFileInput(attrs={"accept": "image/png,image/jpeg,image/webp"}),
                **{**common, "help_text": common["help_text"] or f"PNG, JPEG or WebP, at most {limit // 2**20} MiB."},
            )
        raise ValueError(f"unknown parameter type {kind!r}")

    def clean(self):
        cleaned = super().clean()
        for name, param in self.declared.items():
            if param["type"] == "image":
                self._clean_image(name, param, cleaned)
            if param["type"] == "seed" and name not in self.errors:
                random, seed = cleaned.get(random_field_name(name)), cleaned.get(name)
                if random and seed is not None:
                    self.add_error(name, "Untick “random” to use the seed you typed, or clear the seed.")
                elif not random and seed is None:
                    self.add_error(name, "Enter a seed or tick “random”.")
        return cleaned

    def _clean_image(self, name, param, cleaned):
        upload, kept = cleaned.get(name), cleaned.get(kept_field_name(name))
        if upload:
            try:
                read_image(upload)
            except BindingError as exc:
                self.add_error(name, next(iter(exc.details.values()), exc.message))
            finally:
                upload.seek(0)
        elif kept:
            found = self.own_upload(kept)
            if found is None:
                self.add_error(name, "The image chosen before is no longer there: choose it again.")
            else:
                self.kept[name] = found
        elif param.get("required", True) is not False:
            self.add_error(name, "Choose an image.")

    def own_upload(self, pk):
        try:
            return Upload.objects.filter(owner=self.user, pk=uuid.UUID(str(pk))).first()
        except ValueError:
            return None

    def keep_valid_images(self):
        """
        After a failed submit: store each image that was fine, and hold it in the form as a kept upload, so that
        the page shows it again and the next submit uses it without a new pick.
        """
        if not any(self.files.get(name) for name in self.declared):
            return
        self.data = self.data.copy()
        for name, param in self.declared.items():
            upload = self.files.get(name)
            if param["type"] != "image" or not upload or name in self.errors:
                continue
            try:
                stored = store_upload(self.user, upload)
            except StorageFull as exc:
                if str(exc) not in self.non_field_errors():  # the submit may have said so already
                    self.add_error(None, str(exc))
                return  # nothing is kept
            except BindingError as exc:
                self.add_error(name, next(iter(exc.details.values()), exc.message))
                continue
            except StorageUnavailable:
                self.add_error(name, STORAGE_DOWN)
                continue
            self.kept[name] = stored
            self.data[kept_field_name(name)] = str(stored.pk)

    def inputs(self):
        """The API-shaped inputs, without images (they are stored on submit)."""
        inputs = {}
        for name, param in self.declared.items():
            value = self.cleaned_data.get(name)
            if param["type"] == "image":
                continue
            if param["type"] == "seed" and self.cleaned_data.get(random_field_name(name)):
                value = None  # bind() draws a fresh one
            if param["type"] == "choice":
                # Choices come back as text; give bind() the declared value (which may be a number).
                value = next((choice for choice in param["choices"] if str(choice) == value), value)
            if value is not None:
                inputs[name] = value  # an optional text left empty stays empty: it is not the default
        return inputs

    def batch(self):
        """The inputs of each task to create: consecutive seeds, from the one typed or a random one."""
        count = self.cleaned_data.get(self.batch_name) or 1
        first = self.inputs()
        seeds = {
            name: first[name] if name in first else secrets.randbelow(2**48)
            for name, param in self.declared.items()
            if param["type"] == "seed"
        }
        return [
            {**first, **{name: (seed + index) % (SEED_MAX + 1) for name, seed in seeds.items()}}
            for index in range(count)
        ]

    @staticmethod
    def _discard(stored):
        for upload in stored:
            # The rows went with the rollback; the files must go too.
            with contextlib.suppress(OSError):
                upload.file.delete(save=False)

    def submit(self, priority=0):
        """Store the uploaded images and create the tasks; on bad input, add field errors and return []."""
        stored = []
        try:
            with transaction.atomic():
                images = {}
                for name, param in self.declared.items():
                    if param["type"] == "image" and self.cleaned_data.get(name):
                        upload = store_upload(self.user, self.cleaned_data[name])
                        stored.append(upload)
                        images[name] = str(upload.pk)
                    elif name in self.kept:
                        images[name] = str(self.kept[name].pk)
                slug = self.workflow.slug
                return [
                    create_task(self.user, {"workflow": slug, "inputs": {**inputs, **images}, "priority": priority})[0]
                    for inputs in self.batch()
                ]
        except (QuotaExceeded, StorageFull) as exc:
            self.add_error(None, str(exc))
            self._discard(stored)
            return []
        except StorageUnavailable:
            self.add_error(None, STORAGE_DOWN)
            self._discard(stored)
            return []
        except BindingError as exc:
            self._discard(stored)
            for place, message in exc.details.items():
                field = place.removeprefix("inputs.")  # create_task names places in its body: inputs.prompt
                self.add_error(field if field in self.fields else None, message)
            if not exc.details:
                self.add_error(None, exc.message)
            return []
