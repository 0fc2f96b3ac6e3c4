import re

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from servers.connection import standalone
from servers.recovery import recover as recover_stuck
from tasks.models import (
    ACTIVE_STATUSES,
    ApiToken,
    Task,
    TaskEvent,
    TaskOutput,
    TaskStatus,
    Upload,
    WebhookDelivery,
    Workflow,
    new_secret,
    webhook_url_problem,
)

SHORT_ID = re.compile(r"[0-9a-f]{8}")  # the first 8 hex digits of a UUID, as the task list shows them


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "enabled", "preview_method", "updated_at"]
    search_fields = ["slug", "name"]


class TaskEventInline(admin.TabularInline):
    model = TaskEvent
    extra = 0
    can_delete = False
    fields = ["at", "kind", "from_status", "to_status", "server", "prompt_id", "message"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


class TaskOutputInline(admin.TabularInline):
    model = TaskOutput
    extra = 0
    can_delete = False
    fields = ["preview", "filename", "content_type", "announced_type", "size", "sha256", "node_id"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False

    @admin.display(description="preview")
    def preview(self, output):
        if not output.is_image:
            return format_html('<a href="{}">download</a>', reverse("admin-output", args=[output.pk]))
        return format_html(
            '<a href="{}" target="_blank"><img src="{}" alt="" style="max-width:96px;max-height:96px"></a>',
            reverse("admin-output", args=[output.pk]),
            reverse("admin-output", args=[output.pk]),
        )


class WebhookDeliveryInline(admin.TabularInline):
    model = WebhookDelivery
    fields = ["event", "status", "attempts", "last_status_code", "last_error", "url", "created_at", "delivered_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class QuietFilter(admin.SimpleListFilter):
    title = "quiet for more than"
    parameter_name = "quiet"
    options = {"5": "5 minutes", "15": "15 minutes", "60": "1 hour", "240": "4 hours"}

    def lookups(self, request, model_admin):
        return list(self.options.items())

    def queryset(self, request, queryset):
        if self.value() in self.options:
            return queryset.quiet(for_=timezone.timedelta(minutes=int(self.value())))
        return queryset


class TaskActionForm(ActionForm):
    reason = forms.CharField(required=False, label="Reason (for “fail”)", max_length=300)


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = [
        "short_id", "owner", "workflow", "status", "progress", "server", "short_prompt_id", "attempts", "last_event_at",
    ]
    list_filter = ["status", QuietFilter, "server", "workflow", "owner"]
    search_fields = ["=id", "=prompt_id", "owner__username"]
    readonly_fields = [f.name for f in Task._meta.fields]
    inlines = [TaskEventInline, TaskOutputInline, WebhookDeliveryInline]
    action_form = TaskActionForm
    actions = ["reconcile_now", "recover", "retry", "cancel", "fail"]

    def has_add_permission(self, request):
        return False  # tasks are submitted by users through the pages or the API

    @admin.display(description="id", ordering="id")
    def short_id(self, task):
        # Eight hex characters tell tasks apart on a page; the whole UUID wraps the column at 1280 px.
        return format_html('<code title="{}">{}</code>', task.pk, str(task.pk)[:8])

    @admin.display(description="prompt id", ordering="prompt_id")
    def short_prompt_id(self, task):
        if not task.prompt_id:
            return "-"
        return format_html('<code title="{}">{}</code>', task.prompt_id, task.prompt_id[:8])

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip().lower()
        if SHORT_ID.fullmatch(term):
            # The short id the list shows: the start of a task's id or prompt_id.
            return queryset.filter(Q(id__startswith=term) | Q(prompt_id__startswith=term)), False
        # "=id" on a UUID field: a search term that is not a UUID must not crash the changelist.
        try:
            return super().get_search_results(request, queryset, search_term)
        except Exception:  # noqa: BLE001
            return queryset.filter(prompt_id=search_term), False

    @admin.action(description="Reconcile now with their servers' /queue and /history")
    def reconcile_now(self, request, queryset):

        servers = {task.server for task in queryset.filter(status__in=ACTIVE_STATUSES, server__isnull=False)}
        skipped = queryset.exclude(status__in=[TaskStatus.SUBMITTED, TaskStatus.RUNNING]).count()

        async def run(server):
            conn = standalone(server)
            try:
                return await conn.reconcile("admin")
            finally:
                await conn.client.close()

        for server in servers:
            try:
                settled = async_to_sync(run)(server)
            except Exception as exc:  # noqa: BLE001  (reported to the operator, not swallowed)
                self.message_user(request, f"Server {server.name}: could not reconcile: {exc}", messages.ERROR)
            else:
                message = f"Server {server.name} reconciled: {settled} task(s) changed."
                self.message_user(request, message, messages.SUCCESS)
        if skipped:
            self.message_user(request, f"{skipped} selected task(s) are not on a server: nothing to reconcile.",
                              messages.WARNING)

    @admin.action(description="Recover: apply the next stuck-task recovery step")
    def recover(self, request, queryset):
        ids = list(queryset.filter(status__in=[TaskStatus.SUBMITTED, TaskStatus.RUNNING]).values_list("pk", flat=True))
        skipped = queryset.count() - len(ids)
        for action in async_to_sync(recover_stuck)(task_ids=ids, connect=standalone):
            self.message_user(request, str(action), messages.SUCCESS)
        if skipped:
            self.message_user(request, f"{skipped} selected task(s) are not on a server: nothing to recover.",
                              messages.WARNING)

    @admin.action(description="Retry: send failed or cancelled tasks back to the queue")
    def retry(self, request, queryset):
        done = sum(task.retry(by=request.user.get_username()) for task in queryset)
        self._report(request, done, queryset.count(), "sent back to the queue", "they are not failed or cancelled")

    @admin.action(description="Cancel")
    def cancel(self, request, queryset):
        done = sum(task.request_cancel() for task in queryset)
        self._report(request, done, queryset.count(), "cancelled or being cancelled", "they are already finished")

    @admin.action(description="Fail with the reason given above")
    def fail(self, request, queryset):
        reason = (request.POST.get("reason") or "").strip()
        if not reason:
            self.message_user(request, "Give a reason to fail tasks with.", messages.ERROR)
            return
        by = request.user.get_username()
        done = sum(
            task.mark_failed("operator", f"{reason} (failed by {by})", {"by": by}, match_prompt=False)
            for task in queryset
        )
        self._report(request, done, queryset.count(), "failed", "they are already finished")

    def _report(self, request, done, selected, what, why_not):
        if done:
            self.message_user(request, f"{done} task(s) {what}.", messages.SUCCESS)
        if selected - done:
            self.message_user(request, f"{selected - done} task(s) left alone: {why_not}.", messages.WARNING)


@admin.register(Upload)
class UploadAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "original_name", "content_type", "size", "created_at"]
    readonly_fields = ["id", "owner", "original_name", "content_type", "size", "sha256", "width", "height", "file"]


class ApiTokenForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["user", "name", "webhook_url"]

    def clean_webhook_url(self):
        url = self.cleaned_data["webhook_url"].strip()
        problem = webhook_url_problem(url) if url else None
        if problem:
            raise forms.ValidationError(f"The webhook URL {problem}.")
        return url


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    form = ApiTokenForm
    list_display = ["prefix", "user", "name", "webhook_url", "created_at", "last_used_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at"]

    def has_add_permission(self, request):
        return False  # tokens are shown once, so they are made by `manage.py create_token`

    def save_model(self, request, obj, form, change):
        made = obj.webhook_url and not obj.webhook_secret
        if made:
            obj.webhook_secret = new_secret()
        super().save_model(request, obj, form, change)
        if made:
            # Shown this once, like the token: the receiver needs it to check signatures.
            self.message_user(
                request, f"Webhook signing secret of {obj.prefix}… (shown once): {obj.webhook_secret}", messages.WARNING
            )


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ["event", "task", "status", "attempts", "last_status_code", "url", "created_at", "delivered_at"]
    list_filter = ["status", "event"]
    search_fields = ["task__id", "url", "message_id"]
    readonly_fields = [field.name for field in WebhookDelivery._meta.fields]
    list_select_related = ["task"]
    actions = ["send_again"]

    def has_add_permission(self, request):
        return False  # made by task transitions only

    def has_change_permission(self, request, obj=None):
        return False

    @admin.action(description="Send again (attempts start over)")
    def send_again(self, request, queryset):
        done = queryset.send_again()
        noun = "delivery" if done == 1 else "deliveries"
        self.message_user(request, f"{done} webhook {noun} queued again.", messages.SUCCESS)
