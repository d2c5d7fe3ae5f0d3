from streamkws.cli import entry

entry()
