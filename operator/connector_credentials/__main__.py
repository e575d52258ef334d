from connector_credentials.cli.main import main

main(prog_name="connector-credentials")
