{{/* The training Job the trainer launches (a template: the trainer fills in name and args). */}}
{{- define "flywheel.trainerJob" -}}
{{- $ctx := dict "root" $ "component" "trainer-job" }}
{{- $job := .Values.trainer.job }}
{{- $prefix := "FLYWHEEL_TRAINER_JOB_" }}
apiVersion: batch/v1
kind: Job
metadata:
  generateName: {{ include "flywheel.fullname" . }}-train-
  namespace: {{ .Release.Namespace }}
  labels:
    {{- include "flywheel.labels" $ctx | nindent 4 }}
spec:
  backoffLimit: {{ $job.backoffLimit }}
  activeDeadlineSeconds: {{ $job.activeDeadlineSeconds }}
  ttlSecondsAfterFinished: {{ $job.ttlSecondsAfterFinished }}
  template:
    metadata:
      labels:
        {{- include "flywheel.labels" $ctx | nindent 8 }}
      annotations:
        kubectl.kubernetes.io/default-container: train
        {{- with $job.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      enableServiceLinks: false
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      {{- with include "flywheel.imagePullSecrets" . | trim }}{{ . | nindent 6 }}{{ end }}
      {{- with include "flywheel.scheduling" (dict "root" . "values" $job "gpu" $job.gpu) | trim }}{{ . | nindent 6 }}{{ end }}
      containers:
        - name: train
          image: {{ include "flywheel.image" (dict "root" . "image" $job.image) }}
          imagePullPolicy: {{ include "flywheel.imagePullPolicy" (dict "root" . "image" $job.image) }}
          command: ["python", "-m", "flywheel_trainer.job"]
          args: []
          securityContext:
            {{- toYaml .Values.containerSecurityContext | nindent 12 }}
          env:
            - name: {{ $prefix }}ARTIFACT_ROOT
              value: {{ .Values.artifacts.mountPath | quote }}
            - name: {{ $prefix }}LOGGING__LEVEL
              value: {{ .Values.logLevel | quote }}
            - name: {{ $prefix }}SCRATCH_DIR
              value: /scratch
            - name: HOME
              value: /scratch
            {{- with include "flywheel.settingsEnv" (dict "prefix" $prefix "settings" $job.settings) | trim }}{{ . | nindent 12 }}{{ end }}
            {{- with $job.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            {{- include "flywheel.resources" (dict "root" . "resources" $job.resources "gpu" $job.gpu) | nindent 12 }}
          volumeMounts:
            - name: artifacts
              mountPath: {{ .Values.artifacts.mountPath }}
            - name: scratch
              mountPath: /scratch
            - name: tmp
              mountPath: /tmp
      volumes:
        - name: artifacts
          persistentVolumeClaim:
            claimName: {{ include "flywheel.artifactsClaim" . }}
        - name: scratch
          emptyDir:
            sizeLimit: {{ $job.scratchSize }}
        - name: tmp
          emptyDir:
            sizeLimit: 1Gi
{{- end }}
