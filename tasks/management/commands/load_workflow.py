from django.core.management.base import BaseCommand, CommandError

from tasks.workflows import WorkflowFileError, load_demo_workflows, load_workflow


class Command(BaseCommand):
    help = "Create or update workflows (by slug) from workflow JSON files; --demo loads the shipped ones."

    def add_arguments(self, parser):
        parser.add_argument("files", nargs="*", metavar="FILE.json")
        parser.add_argument(
            "--demo", action="store_true", help="Load the demo workflows shipped in workflows/"
        )

    def handle(self, files, demo, **options):
        if not files and not demo:
            raise CommandError("Name at least one workflow file, or pass --demo.")
        if demo:
            for workflow in load_demo_workflows():
                self.stdout.write(f"Loaded demo workflow {workflow.slug}.")
        for path in files:
            try:
                workflow, created = load_workflow(path)
            except WorkflowFileError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"{'Created' if created else 'Updated'} workflow {workflow.slug} from {path}.")
