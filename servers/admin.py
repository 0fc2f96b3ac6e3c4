from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.db.models import Count, Q

from servers.connection import probe_once, standalone
from servers.consistency import check
from servers.models import Lock, Server, ServerEvent, StalePrompt


class ServerEventInline(admin.TabularInline):
    model = ServerEvent
    extra = 0
    can_delete = False
    fields = ["at", "kind", "from_state", "to_state", "message"]
    readonly_fields = fields
    ordering = ["-at", "-pk"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Server)
class ServerAdmin(admin.ModelAdmin):
    list_display = [
        "name", "base_url", "enabled", "draining_shown", "state", "state_reason", "in_flight", "waiting", "weight",
        "pipeline_depth", "max_in_flight", "foreign_queue", "last_seen", "last_error",
    ]
    list_filter = ["enabled", "draining", "state"]
    search_fields = ["name", "base_url"]
    readonly_fields = [
        "state", "state_reason", "state_changed_at", "client_id", "last_seen", "last_error", "foreign_queue",
        "fingerprint", "last_probe_at", "capabilities_at", "comfyui_version", "created_at",
    ]
    exclude = ["capabilities"]
    inlines = [ServerEventInline]
    actions = ["drain", "undrain", "enable", "disable", "probe_now", "consistency_check", "consistency_fix"]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                running_count=Count("tasks", filter=Q(tasks__status="running")),
                waiting_count=Count("tasks", filter=Q(tasks__status="submitted")),
            )
        )

    @admin.display(description="draining", ordering="draining")
    def draining_shown(self, server):
        # Not the boolean icon: its red cross reads as an error, and not draining is the normal case.
        return "yes" if server.draining else "no"

    @admin.display(description="running", ordering="running_count")
    def in_flight(self, server):
        return server.running_count

    @admin.display(description="queued there", ordering="waiting_count")
    def waiting(self, server):
        return server.waiting_count

    @admin.action(description="Probe now (/system_stats, /queue, /object_info)")
    def probe_now(self, request, queryset):
        for server in queryset:
            answered, message = async_to_sync(probe_once)(server)
            self.message_user(request, message, messages.SUCCESS if answered else messages.ERROR)

    @admin.action(description="Consistency check (report only)")
    def consistency_check(self, request, queryset):
        self._consistency(request, queryset, fix=False)

    @admin.action(description="Consistency check and repair")
    def consistency_fix(self, request, queryset):
        self._consistency(request, queryset, fix=True)

    def _consistency(self, request, queryset, fix):
        for server in queryset:
            report = async_to_sync(check)(standalone, server.name, fix)
            for finding in report.findings:
                level = messages.SUCCESS if finding.action and not finding.action.startswith("cannot") else (
                    messages.WARNING
                )
                self.message_user(request, str(finding), level)
            self.message_user(
                request, f"Server {server.name}: {report.summary()}",
                messages.WARNING if report.findings else messages.SUCCESS,
            )

    @admin.action(description="Drain: take no new work, finish what they have")
    def drain(self, request, queryset):
        count = queryset.drain()
        self.message_user(request, f"{count} server(s) draining: no new work goes to them.", messages.SUCCESS)

    @admin.action(description="Stop draining: take new work again")
    def undrain(self, request, queryset):
        count = queryset.undrain()
        self.message_user(request, f"{count} server(s) take new work again.", messages.SUCCESS)

    @admin.action(description="Enable")
    def enable(self, request, queryset):
        count = queryset.update(enabled=True)
        self.message_user(request, f"{count} server(s) enabled.", messages.SUCCESS)

    @admin.action(description="Disable (its socket closes; tasks on it are followed up when it is enabled again)")
    def disable(self, request, queryset):
        count = queryset.update(enabled=False)
        self.message_user(request, f"{count} server(s) disabled.", messages.SUCCESS)


@admin.register(Lock)
class LockAdmin(admin.ModelAdmin):
    list_display = ["purpose", "key", "owner", "server", "acquired_at", "expires_at"]
    list_filter = ["purpose", "server"]
    search_fields = ["key", "owner"]
    readonly_fields = ["purpose", "key", "owner", "server", "acquired_at", "expires_at"]
    actions = ["release"]

    def has_add_permission(self, request):
        return False

    @admin.action(description="Release the selected locks")
    def release(self, request, queryset):
        count = queryset.count()
        queryset.delete()
        self.message_user(
            request,
            f"Released {count} lock(s). An upstream lease still in use is taken again by its worker on its next step.",
            messages.SUCCESS,
        )


@admin.register(StalePrompt)
class StalePromptAdmin(admin.ModelAdmin):
    list_display = ["prompt_id", "server", "task", "created_at"]
    list_filter = ["server"]
    readonly_fields = ["prompt_id", "server", "task", "created_at"]
