from cityhealth.cli import app

app()
