from connector_credentials.cli import main

main(prog_name="connector-credentials")
