{{/*
Names, labels, images and the pieces every Flywheel workload shares. Helpers that need a
component take a dict: (dict "root" $ "component" "inference").
*/}}

{{- define "flywheel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flywheel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flywheel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<fullname>-<component>": the name of a component's objects. */}}
{{- define "flywheel.componentName" -}}
{{- printf "%s-%s" (include "flywheel.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of the whole release (no component). */}}
{{- define "flywheel.releaseLabels" -}}
helm.sh/chart: {{ include "flywheel.chart" . }}
app.kubernetes.io/name: {{ include "flywheel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: flywheel
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Standard labels of a component's objects. */}}
{{- define "flywheel.labels" -}}
{{ include "flywheel.releaseLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels that select a component's pods (stable across upgrades). */}}
{{- define "flywheel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels that select every pod of this release. */}}
{{- define "flywheel.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "flywheel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* An image reference from an image block: (dict "root" $ "image" .Values.inference.image). */}}
{{- define "flywheel.image" -}}
{{- $global := .root.Values.global.image }}
{{- $repo := .image.repository }}
{{- if $global.registry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" $global.registry) $repo }}
{{- end }}
{{- if .image.digest }}
{{- printf "%s@%s" $repo .image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (.image.tag | default $global.tag | default .root.Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "flywheel.imagePullPolicy" -}}
{{- .image.pullPolicy | default .root.Values.global.image.pullPolicy }}
{{- end }}

{{/* The environment variable prefix of a component's settings: FLYWHEEL_<COMPONENT>_. */}}
{{- define "flywheel.envPrefix" -}}
{{- printf "FLYWHEEL_%s_" (.component | upper | replace "-" "_") }}
{{- end }}

{{/*
Settings rendered as environment variables, nested like pydantic-settings reads them:
(dict "prefix" "FLYWHEEL_INFERENCE_" "settings" .Values.inference.settings) turns
{generation: {max_new_tokens: 256}} into FLYWHEEL_INFERENCE_GENERATION__MAX_NEW_TOKENS=256.
Lists are passed as JSON, which pydantic parses.
*/}}
{{- define "flywheel.settingsEnv" -}}
{{- $prefix := .prefix }}
{{- range $key, $value := .settings }}
{{- $name := printf "%s%s" $prefix ($key | upper) }}
{{- if kindIs "map" $value }}
{{- include "flywheel.settingsEnv" (dict "prefix" (printf "%s__" $name) "settings" $value) }}
{{- else }}
- name: {{ $name }}
  value: {{ if kindIs "slice" $value }}{{ toJson $value | quote }}{{ else }}{{ $value | toString | quote }}{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The name of the Secret with the API tokens and keys. */}}
{{- define "flywheel.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "flywheel.fullname" .)) }}
{{- end }}

{{/* The name of the artifact store's claim. */}}
{{- define "flywheel.artifactsClaim" -}}
{{- .Values.artifacts.existingClaim | default (printf "%s-artifacts" (include "flywheel.fullname" .)) }}
{{- end }}

{{/* Where secrets are mounted. */}}
{{- define "flywheel.secretsDir" -}}/etc/flywheel/secrets{{- end }}
{{- define "flywheel.tlsDir" -}}/etc/flywheel/tls{{- end }}
{{- define "flywheel.kafkaDir" -}}/etc/flywheel/kafka{{- end }}

{{/*
Environment shared by every service: listen addresses, logging, tracing, artifact root (unless
"noArtifacts"), Kafka.
*/}}
{{- define "flywheel.commonEnv" -}}
{{- $root := .root }}
{{- $prefix := include "flywheel.envPrefix" . }}
{{- $values := index $root.Values .component }}
{{- $kafka := $root.Values.kafka }}
- name: FLYWHEEL_MODE
  value: {{ $root.Values.mode | quote }}
- name: {{ $prefix }}GRPC__HOST
  value: "0.0.0.0"
- name: {{ $prefix }}GRPC__PORT
  value: {{ $values.ports.grpc | quote }}
- name: {{ $prefix }}METRICS__HOST
  value: "0.0.0.0"
- name: {{ $prefix }}METRICS__PORT
  value: {{ $values.ports.metrics | quote }}
- name: {{ $prefix }}LOGGING__LEVEL
  value: {{ $root.Values.logLevel | quote }}
- name: {{ $prefix }}LOGGING__JSON_FORMAT
  value: "true"
{{- if $root.Values.tracing.otlpEndpoint }}
- name: {{ $prefix }}TRACING__OTLP_ENDPOINT
  value: {{ $root.Values.tracing.otlpEndpoint | quote }}
- name: {{ $prefix }}TRACING__SAMPLE_RATIO
  value: {{ $root.Values.tracing.sampleRatio | quote }}
{{- end }}
{{- if not .noArtifacts }}
- name: {{ $prefix }}ARTIFACT_ROOT
  value: {{ $root.Values.artifacts.mountPath | quote }}
{{- end }}
{{ include "flywheel.kafkaEnv" (dict "root" $root "prefix" $prefix "clientId" (include "flywheel.componentName" .)) | trim }}
{{- end }}

{{/* Kafka client settings: (dict "root" $ "prefix" "FLYWHEEL_X_" "clientId" "..."). */}}
{{- define "flywheel.kafkaEnv" -}}
{{- $kafka := .root.Values.kafka }}
{{- $prefix := .prefix }}
- name: {{ $prefix }}KAFKA__BOOTSTRAP_SERVERS
  value: {{ $kafka.bootstrapServers | quote }}
- name: {{ $prefix }}KAFKA__SECURITY_PROTOCOL
  value: {{ $kafka.securityProtocol | quote }}
- name: {{ $prefix }}KAFKA__CLIENT_ID
  value: {{ .clientId | quote }}
- name: {{ $prefix }}KAFKA__TOPICS__INTERACTIONS
  value: {{ $kafka.topics.names.interactions | quote }}
- name: {{ $prefix }}KAFKA__TOPICS__FEEDBACK
  value: {{ $kafka.topics.names.feedback | quote }}
- name: {{ $prefix }}KAFKA__TOPICS__CANDIDATES
  value: {{ $kafka.topics.names.candidates | quote }}
- name: {{ $prefix }}KAFKA__TOPICS__DECISIONS
  value: {{ $kafka.topics.names.decisions | quote }}
- name: {{ $prefix }}KAFKA__TOPICS__DEAD_LETTER
  value: {{ $kafka.topics.names.deadLetter | quote }}
- name: {{ $prefix }}KAFKA__PARTITIONS
  value: {{ $kafka.topics.partitions | quote }}
- name: {{ $prefix }}KAFKA__REPLICATION_FACTOR
  value: {{ $kafka.topics.replicationFactor | quote }}
- name: {{ $prefix }}KAFKA__RETENTION_MS
  value: {{ $kafka.topics.retentionMs | int64 | quote }}
{{- if hasPrefix "SASL_" $kafka.securityProtocol }}
- name: {{ $prefix }}KAFKA__SASL_MECHANISM
  value: {{ required "kafka.sasl.mechanism is required when kafka.securityProtocol is SASL_*" $kafka.sasl.mechanism | quote }}
- name: {{ $prefix }}KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.existingSecret is required when kafka.securityProtocol is SASL_*" $kafka.sasl.existingSecret }}
      key: {{ $kafka.sasl.usernameKey }}
- name: {{ $prefix }}KAFKA__SASL_PASSWORD_FILE
  value: {{ printf "%s/sasl/%s" (include "flywheel.kafkaDir" .) $kafka.sasl.passwordKey | quote }}
{{- end }}
{{- if hasSuffix "SSL" $kafka.securityProtocol }}
{{- if $kafka.tls.caSecret }}
- name: {{ $prefix }}KAFKA__SSL_CAFILE
  value: {{ printf "%s/ca/%s" (include "flywheel.kafkaDir" .) $kafka.tls.caKey | quote }}
{{- end }}
{{- if $kafka.tls.clientSecret }}
- name: {{ $prefix }}KAFKA__SSL_CERTFILE
  value: {{ printf "%s/client/tls.crt" (include "flywheel.kafkaDir" .) | quote }}
- name: {{ $prefix }}KAFKA__SSL_KEYFILE
  value: {{ printf "%s/client/tls.key" (include "flywheel.kafkaDir" .) | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Kafka credential volumes (pod level): (dict "root" $). */}}
{{- define "flywheel.kafkaVolumes" -}}
{{- $kafka := .root.Values.kafka }}
{{- if hasPrefix "SASL_" $kafka.securityProtocol }}
- name: kafka-sasl
  secret:
    secretName: {{ $kafka.sasl.existingSecret }}
    items:
      - key: {{ $kafka.sasl.passwordKey }}
        path: {{ $kafka.sasl.passwordKey }}
{{- end }}
{{- if hasSuffix "SSL" $kafka.securityProtocol }}
{{- if $kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $kafka.tls.caSecret }}
    items:
      - key: {{ $kafka.tls.caKey }}
        path: {{ $kafka.tls.caKey }}
{{- end }}
{{- if $kafka.tls.clientSecret }}
- name: kafka-client
  secret:
    secretName: {{ $kafka.tls.clientSecret }}
{{- end }}
{{- end }}
{{- end }}

{{- define "flywheel.kafkaVolumeMounts" -}}
{{- $kafka := .root.Values.kafka }}
{{- if hasPrefix "SASL_" $kafka.securityProtocol }}
- name: kafka-sasl
  mountPath: {{ include "flywheel.kafkaDir" . }}/sasl
  readOnly: true
{{- end }}
{{- if hasSuffix "SSL" $kafka.securityProtocol }}
{{- if $kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: {{ include "flywheel.kafkaDir" . }}/ca
  readOnly: true
{{- end }}
{{- if $kafka.tls.clientSecret }}
- name: kafka-client
  mountPath: {{ include "flywheel.kafkaDir" . }}/client
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/*
Scheduling of a workload: (dict "root" $ "values" <workload values> "gpu" <gpu block>).
On the GPU pool, the pool's nodeSelector and tolerations are merged in.
*/}}
{{- define "flywheel.scheduling" -}}
{{- $pool := .root.Values.gpuPool }}
{{- $onGpu := .gpu.enabled }}
{{- $nodeSelector := deepCopy (.values.nodeSelector | default dict) }}
{{- $tolerations := .values.tolerations | default list }}
{{- $affinity := .values.affinity | default dict }}
{{- if $onGpu }}
{{- $nodeSelector = merge $nodeSelector (deepCopy ($pool.nodeSelector | default dict)) }}
{{- $tolerations = concat $tolerations ($pool.tolerations | default list) }}
{{- if not $affinity }}
{{- $affinity = $pool.affinity | default dict }}
{{- end }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container resources, with the GPU limit added on the GPU pool: (dict "root" $ "resources" r "gpu" g). */}}
{{- define "flywheel.resources" -}}
{{- $resources := deepCopy (.resources | default dict) }}
{{- if .gpu.enabled }}
{{- $limits := $resources.limits | default dict }}
{{- $_ := set $limits .root.Values.gpuPool.resourceName (.gpu.count | int) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* A native gRPC probe: (dict "probe" <probe values> "port" <port>). */}}
{{- define "flywheel.grpcProbe" -}}
grpc:
  port: {{ .port }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{- define "flywheel.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
ONNX Runtime settings for a component that runs models, consistent with its GPU request and the
pool's memory: (dict "root" $ "component" "inference" "prefix" "FLYWHEEL_INFERENCE_ORT__"
"gpu" <gpu block> "ort" <ort block>). Returns a YAML list of EnvVars; fails on values that cannot work.
*/}}
{{- define "flywheel.ortEnv" -}}
{{- $pool := .root.Values.gpuPool }}
{{- $provider := .ort.provider }}
{{- if eq $provider "auto" }}
{{- $provider = ternary "cuda" "cpu" .gpu.enabled }}
{{- end }}
{{- if and (eq $provider "cuda") (not .gpu.enabled) }}
{{- fail (printf "%s.ort.provider is cuda but %s.gpu.enabled is false: no GPU would be scheduled" .component .component) }}
{{- end }}
{{- $memMiB := int64 .ort.gpuMemLimitMiB }}
{{- if eq $memMiB 0 }}
{{- $memMiB = int64 (floor (mulf $pool.memoryMiB .ort.gpuMemFraction)) }}
{{- end }}
{{- if gt $memMiB (int64 $pool.memoryMiB) }}
{{- fail (printf "%s.ort.gpuMemLimitMiB (%d) exceeds the GPU pool's memory (gpuPool.memoryMiB = %d)" .component $memMiB (int64 $pool.memoryMiB)) }}
{{- end }}
- name: {{ .prefix }}PROVIDER
  value: {{ $provider | quote }}
- name: {{ .prefix }}ARENA_EXTEND_STRATEGY
  value: {{ .ort.arenaExtendStrategy | quote }}
{{- if eq $provider "cuda" }}
- name: {{ .prefix }}GPU_MEM_LIMIT
  value: {{ mul $memMiB 1048576 | quote }}
{{- end }}
- name: {{ .prefix }}INTRA_OP_THREADS
  value: {{ .ort.intraOpThreads | quote }}
{{- end }}
