"""The submit form, generated from a workflow's declared parameters."""

import contextlib

from django import forms
from django.db import transaction

from tasks.params import SEED_MAX, BindingError
from tasks.submission import QuotaExceeded, create_task, read_image, store_upload


def random_field_name(name):
    return f"{name}_random"


class WorkflowForm(forms.Form):
    """
    One field per declared parameter. The fields give the browser its hints (min, max, step) and catch the obvious;
    tasks.params.bind stays the one judge, and its complaints land on the fields they name.
    """

    def __init__(self, workflow, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.workflow = workflow
        self.declared = {param["name"]: param for param in workflow.parameters}
        for name, param in self.declared.items():
            self.fields[name] = self.field_for(param)
            if param["type"] == "seed":
                self.fields[random_field_name(name)] = forms.BooleanField(
                    label="random", required=False, initial=param.get("random", True) is not False
                )

    def rows(self):
        """(bound field, its "random" toggle or None) per parameter, for the template."""
        for name in self.declared:
            toggle = random_field_name(name)
            yield self[name], (self[toggle] if toggle in self.fields else None)

    def field_for(self, param):
        kind = param["type"]
        common = {
            "label": param.get("label") or param["name"].replace("_", " ").capitalize(),
            "help_text": param.get("help", ""),
            "required": param.get("required", True) and "default" not in param and kind != "seed",
            "initial": param.get("default"),
        }
        if kind == "text":
            multiline = param.get("multiline") or param["name"] in ("prompt", "negative")
            widget = forms.Textarea(attrs={"rows": 3}) if multiline else forms.TextInput()
            return forms.CharField(max_length=param.get("max_length", 10_000), widget=widget, strip=False, **common)
        if kind == "int":
            attrs = {"step": param["step"]} if "step" in param else {}
            return forms.IntegerField(
                min_value=param.get("min"), max_value=param.get("max"), widget=forms.NumberInput(attrs), **common
            )
        if kind == "float":
            attrs = {"step": param.get("step", "any")}
            return forms.FloatField(
                min_value=param.get("min"), max_value=param.get("max"), widget=forms.NumberInput(attrs), **common
            )
        if kind == "seed":
            common["help_text"] = common["help_text"] or "Leave “random” ticked for a new seed on every run."
            return forms.IntegerField(min_value=0, max_value=SEED_MAX, **common)
        if kind == "choice":
            return forms.ChoiceField(choices=[(str(choice), str(choice)) for choice in param["choices"]], **common)
        if kind == "image":
            common["required"] = param.get("required", True)
            return forms.FileField(widget=forms.ClearableFileInput(attrs={"accept": "image/*"}), **common)
        raise ValueError(f"unknown parameter type {kind!r}")

    def clean(self):
        cleaned = super().clean()
        for name, param in self.declared.items():
            if param["type"] == "image" and cleaned.get(name):
                upload = cleaned[name]
                try:
                    read_image(upload)
                except BindingError as exc:
                    self.add_error(name, next(iter(exc.details.values()), exc.message))
                finally:
                    upload.seek(0)
            if param["type"] == "seed" and not cleaned.get(random_field_name(name)) and cleaned.get(name) is None:
                self.add_error(name, "Enter a seed or tick “random”.")
        return cleaned

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
            if value is not None and value != "":
                inputs[name] = value
        return inputs

    @staticmethod
    def _discard(stored):
        for upload in stored:
            # The rows went with the rollback; the files must go too.
            with contextlib.suppress(OSError):
                upload.file.delete(save=False)

    def submit(self, user, priority=0):
        """Store the uploaded images and create the task; on bad input, add field errors and return None."""
        stored = []
        try:
            with transaction.atomic():
                inputs = self.inputs()
                for name, param in self.declared.items():
                    if param["type"] == "image" and self.cleaned_data.get(name):
                        upload = store_upload(user, self.cleaned_data[name])
                        stored.append(upload)
                        inputs[name] = str(upload.pk)
                task, _ = create_task(user, {"workflow": self.workflow.slug, "inputs": inputs, "priority": priority})
                return task
        except QuotaExceeded as exc:
            self.add_error(None, str(exc))
            self._discard(stored)
            return None
        except BindingError as exc:
            self._discard(stored)
            for place, message in exc.details.items():
                field = place.removeprefix("inputs.")  # create_task names places in its body: inputs.prompt
                self.add_error(field if field in self.fields else None, message)
            if not exc.details:
                self.add_error(None, exc.message)
            return None
