"""placeholder"""
class Recorder: pass
